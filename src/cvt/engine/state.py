"""Training checkpoints: atomic writes, RNG states, and reading ``last.pt`` / ``best.pt`` back.

A checkpoint holds only tensors and plain containers, so ``torch.load(path, weights_only=True)``
reads it without running any code. Every write goes to a temporary file in the same folder, is
fsynced and then renamed over the target: a kill or a full disk during a save leaves the previous
file intact.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvt.checkpoint.read import safe_torch_load
from cvt.errors import CheckpointError
from cvt.fileio import atomic_write_bytes


def atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and plain values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator back to a :func:`capture_rng` state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_train_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``last.pt`` / ``best.pt`` written by ``cvt train`` (weights only: no code runs)."""
    path = Path(path)
    if path.is_dir():  # a run folder: its last.pt is the checkpoint to continue from
        hint = f"; resume from {path / 'last.pt'}" if (path / "last.pt").is_file() else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a last.pt/best.pt file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ckpt = safe_torch_load(path)
    required = ("model", "optimizer", "epoch", "step", "config")
    missing = [k for k in required if k not in ckpt] if isinstance(ckpt, dict) else list(required)
    if missing:
        raise CheckpointError(f"{path} is not a cvt train checkpoint (missing {', '.join(missing)})")
    return ckpt

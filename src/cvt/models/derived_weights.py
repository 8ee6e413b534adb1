"""Weights derived from parameters for the fast paths, kept between inference calls.

BatchNorm folded into a conv, QuickGELU's scale moved into the MLP, q/k/v weights concatenated,
autocast copies, oneDNN-packed linear weights: :class:`DerivedWeights` caches each of them while no
autograd graph is built and recomputes it as soon as a source tensor changes;
:class:`CachesDerivedWeights` is the base of the modules that keep one (``train()``/``eval()`` drop
it); :class:`CastCachedLinear` is the ``nn.Linear`` that keeps its own cast or packed weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from cvt.models import cpu_kernels
from cvt.models.call_context import builds_no_graph, transformed
from cvt.precision import active_autocast_dtype, autocast_casts


class DerivedWeights:
    """Tensors computed from parameters or buffers, reused while no autograd graph is being built.

    The cache is keyed on the identity, in-place version counter, storage, dtype and device of every
    source tensor (an optimizer step or ``load_state_dict`` bumps the version; ``.to()`` and
    ``.double()`` keep the Parameter object and its version but give it new storage), on the number of
    ``torch.optim`` steps taken in this process (fused optimizers, ``AdamW(fused=True)``, update
    parameters without moving their version counters), on the non-tensor settings the derivation
    reads (a BatchNorm's ``eps``) and on the autocast state: under autocast the cached copies are
    already in the autocast dtype, saving a cast per call. With grad enabled or under ``torch.compile``
    the tensors are recomputed on every call (autograd must see them); under ``torch.jit.trace`` too, so
    the trace records the derivation, not a frozen copy; for inference tensors (made under
    ``torch.inference_mode``), which have no version counter; and for ``torch.func``-transformed ones.
    One entry per object: calls that alternate autocast states (fp32, then bf16, then fp32 …) recompute
    it on every call (CvT-13 at batch 8: 13-17 % slower per call); a model copy per state avoids that.
    Under autocast, float64 values stay float64, as autocast leaves float64 tensors alone.
    The entry is read and replaced as one object, so modules called from several threads at once
    (``nn.DataParallel`` replicas share this object) each get the tensors of their own sources.
    Not pickled and not deep-copied: a copy starts empty.
    """

    optimizer_steps = 0  # counted by a post-hook on every torch.optim optimizer's step()

    def __init__(self) -> None:
        # (state, [(weak source, its key, its storage)], value), or None before the first call
        self._entry: tuple[tuple[Any, ...], list[tuple[weakref.ref, tuple[Any, ...], Any]], Any] | None = None

    def get(
        self,
        sources: tuple[torch.Tensor, ...],
        compute: Callable[[], tuple[torch.Tensor, ...]],
        settings: tuple[Any, ...] = (),
    ) -> tuple[torch.Tensor, ...]:
        """``compute()`` in the autocast dtype (where autocast would cast it), or its cached result when
        the sources, the non-tensor ``settings`` that ``compute`` reads (a BatchNorm's ``eps``) and the
        autocast state are unchanged."""
        cast_to = active_autocast_dtype(sources[0].device.type)
        if not self.keeps(sources):
            # cast here too: autocast skips the bias of a conv under ``vmap`` over stacked parameters
            return self._cast(compute(), cast_to)
        state = (cast_to, DerivedWeights.optimizer_steps, settings)
        entry = self._entry  # one read: another thread may replace the entry meanwhile
        if entry is not None and entry[0] == state and self._same_sources(entry[1], sources):
            return entry[2]
        value = self._cast(compute(), cast_to)
        # each source's storage is held, so that no later tensor can take its address: a key naming the
        # address of freed memory would match a new tensor there (``param.data`` assigned twice between
        # calls, the second reusing the first's memory: same Parameter, version and dtype)
        self._entry = (state, [(weakref.ref(t), self._key(t), t.untyped_storage()) for t in sources], value)
        return value

    @staticmethod
    def _cast(value: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        """``value``'s tensors that autocast would cast, in ``dtype`` (all of them as they are if None)."""
        if dtype is None:
            return value
        return tuple(v.to(dtype) if v is not None and autocast_casts(v) else v for v in value)

    @staticmethod
    def keeps(sources: tuple[torch.Tensor, ...]) -> bool:
        """Whether :meth:`get` may keep what it computes from ``sources`` now: no graph built, not traced
        or compiled, and no inference tensor or :func:`~cvt.models.call_context.transformed` one among
        them (``vmap`` over stacked parameters: no storage to key on; a kept value would lose a tangent)."""
        if not builds_no_graph() or transformed(*sources):
            return False
        return not any(t.is_inference() for t in sources)

    @property
    def cached(self) -> tuple[torch.Tensor, ...] | None:
        """The tensors kept from the last :meth:`get` that could keep them, or None."""
        entry = self._entry
        return None if entry is None else entry[2]

    @classmethod
    def _same_sources(
        cls, recorded: list[tuple[weakref.ref, tuple[Any, ...], Any]], sources: tuple[torch.Tensor, ...]
    ) -> bool:
        """Whether ``sources`` are the recorded tensors, unchanged since."""
        if len(recorded) != len(sources):
            return False
        pairs = zip(recorded, sources, strict=True)
        return all(ref() is t and key == cls._key(t) for (ref, key, _storage), t in pairs)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[Any, ...]:
        return t._version, t.data_ptr(), t.dtype, t.device

    def clear(self) -> None:
        """Forget the cached tensors: the next :meth:`get` computes them anew."""
        self._entry = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    DerivedWeights.optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class CachesDerivedWeights(nn.Module):
    """Base of the modules that keep :class:`DerivedWeights`: ``train()`` and ``eval()`` clear them.

    Version counters miss one kind of edit: through ``param.data`` (``p.data.copy_(...)`` in weight
    averaging or surgery code), whose alias has a counter of its own. Code that edits weights that way
    and then hands the model back with ``model.eval()`` or ``model.train()`` gets fresh derived weights.
    """

    def clear_derived(self) -> None:
        """Drop this module's derived weights (recomputed on the next call that needs them)."""
        for value in vars(self).values():
            if isinstance(value, DerivedWeights):
                value.clear()

    def train(self, mode: bool = True) -> CachesDerivedWeights:
        self.clear_derived()
        return super().train(mode)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> CachesDerivedWeights:
        # .to(), .double(), .half(), .cuda() …: the derived weights of the old tensors would keep them
        # alive (CvT-13: ~72 MB of fp32 weights and their packed copies) until the next call
        self.clear_derived()
        return super()._apply(fn, recurse)


class CastCachedLinear(CachesDerivedWeights, nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose autocast copies of weight and bias are
    kept between calls while no graph is built, instead of autocast casting them on every call; in CPU
    inference on AVX-512 (bf16; fp32 off Intel), for products large enough to repay oneDNN's per-call cost,
    they are kept packed for oneDNN's linear kernel (``onednn_linear``), and fp32 training off Intel
    runs that kernel on the plain weights (:func:`~cvt.models.cpu_kernels.graph_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.onednn_linear = True
        self._cast = DerivedWeights()
        self._packed = DerivedWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        dtype = cpu_kernels.linear_dtype(x, self.weight) if self.onednn_linear else None
        if dtype is not None and DerivedWeights.keeps(params):
            weight, bias = self._packed.get(
                params, lambda: cpu_kernels.pack_linear(self.weight, self.bias, dtype)
            )
            return cpu_kernels.linear(x.to(dtype), weight, bias)
        weight, *bias = self._cast.get(params, lambda: params)
        return cpu_kernels.graph_linear(self.onednn_linear, x, weight, bias[0] if bias else None)

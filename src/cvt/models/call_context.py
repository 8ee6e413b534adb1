"""When the model's fast paths may run: what the current call is doing (building an autograd graph,
being traced or compiled, running under ``torch.func`` transforms or forward-mode AD, on transformed
tensors), asked by the
layers before they take a cached, packed or oneDNN path, and by :class:`~cvt.models.CvT` before its
eager-only input checks; and :func:`evaluating`, the eval mode that read-only calls (evaluation, FLOP
counting, attention maps) run a caller's model in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd import forward_ad


def traced_or_compiled() -> bool:
    """Whether the current call is traced (``torch.jit.trace``) or compiled (``torch.compile``): a trace
    or graph must see the plain ops, not the fast paths' kernels."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def builds_no_graph() -> bool:
    """Whether the current call builds no autograd graph and is neither traced nor compiled: the
    precondition of every cached or packed inference path."""
    return not (torch.is_grad_enabled() or traced_or_compiled())


def runs_plain_ops_only(*tensors: torch.Tensor) -> bool:
    """Whether ``torch.func`` transforms are active or one of ``tensors`` carries a forward-mode tangent:
    oneDNN's ops have no derivative formulas or batching rules, so they would drop the tangent (or be
    refused) where ``F.linear`` works."""
    if torch._C._are_functorch_transforms_active():
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def transformed(*tensors: torch.Tensor) -> bool:
    """Whether one of ``tensors`` is a ``torch.func`` transform's wrapper (batched by ``vmap``, dual
    in ``jvp``: no storage of its own) or carries a forward-mode tangent: what a cache must not keep."""
    # neither exists outside a transform or a dual level: one check per call instead of one per tensor
    if not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0:
        return False
    return any(
        is_functorch_wrapped_tensor(t) or forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode, then give every submodule back its own train/eval flag: a training
    model with a frozen (eval-mode) BatchNorm keeps it frozen, which ``model.train(was_training)`` would
    undo."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])  # through train(): the cached derived weights are dropped on a mode change
        for module, training in modes:
            module.training = training

"""Forward hooks keyed by module name, inside a context manager that always removes them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch


@contextmanager
def trace_inputs(modules: Mapping[str, torch.nn.Module], names: Iterable[str],
                 fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` with the first positional input of each named module on every
    forward, for the duration of the block. Hooks are removed in ``finally``, also on error or
    Cancel. ``modules`` is typically ``dict(model.named_modules())``."""
    handles = []
    try:
        for name in names:
            mod = modules.get(name)
            if mod is None:
                raise KeyError(f"no module named {name!r} in the model")
            handles.append(mod.register_forward_pre_hook(_pre(name, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trace_outputs(modules: Mapping[str, torch.nn.Module], names: Iterable[str],
                  fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Like `trace_inputs` for outputs; if ``fn`` returns a tensor it replaces the output."""
    handles = []
    try:
        for name in names:
            mod = modules.get(name)
            if mod is None:
                raise KeyError(f"no module named {name!r} in the model")
            handles.append(mod.register_forward_hook(_post(name, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def _pre(name, fn):
    def hook(_mod, args):
        fn(name, args[0])
    return hook


def _post(name, fn):
    def hook(_mod, _args, out):
        return fn(name, out)
    return hook


# ComfyUI's transformer blocks add residuals in place (``x += attn(norm(x))``) after the pre-norm
# saved ``x`` for its backward, which autograd rejects. Giving each pre-norm a private copy of its
# input makes the blocks trainable without touching ComfyUI. UNet blocks name them norm1..3 (so do
# SD3's MMDiT blocks), CLIP layers layer_norm1..2, Flux's blocks img/txt_norm1..2 and pre_norm.
RESIDUAL_PRE_NORMS = ("norm1", "norm2", "norm3", "layer_norm1", "layer_norm2")
DIT_PRE_NORMS = ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2", "pre_norm")


def _copy_first_input(_mod, args):
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(),) + tuple(args[1:])
    return None


def copy_norm_inputs(module: torch.nn.Module, names: Iterable[str] = RESIDUAL_PRE_NORMS) -> list:
    """Register the pre-norm input copies (only while grad is enabled); returns the hook handles."""
    names = tuple(names)
    return [m.register_forward_pre_hook(_copy_first_input)
            for n, m in module.named_modules() if n.rsplit(".", 1)[-1] in names]


@contextmanager
def norm_inputs_copied(module: torch.nn.Module, names: Iterable[str] = RESIDUAL_PRE_NORMS) -> Iterator[None]:
    """`copy_norm_inputs` for the duration of the block; the hooks are always removed."""
    handles = copy_norm_inputs(module, names)
    try:
        yield
    finally:
        for h in handles:
            h.remove()

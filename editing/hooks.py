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

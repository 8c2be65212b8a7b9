"""Training on a frozen network: trainable adapters by forward hooks keyed by module name, their
fold-back into an `Edit`, and the one training-loop skeleton every trainer runs (`train_loop`).

Every training method here (unlearning, distillation, the resurgence audit) sees the model the same
way: the host's UNet module, never written to, plus forward hooks that add
- *fixed* weight changes (an existing Edit: a pruning mask, a UCE edit …), and
- *trainable* changes: a LoRA pair ΔW = (α/r)·B·A, or a dense ΔW (ESD-x / ESD-u style).
Because a Linear/Conv output is linear in its weight, ``f(x; W) + f(x; ΔW) = f(x; W + ΔW)``: the hook
trains exactly the weight W + ΔW without touching W. The result folds into an Edit of ``lowrank`` or
``delta`` Changes keyed by ComfyUI patch key.

ComfyUI runs a graph under ``torch.inference_mode()``: its weights are inference tensors, which
autograd refuses to save for backward. `frozen_session` swaps such parameters for plain clones for the
duration of training and puts the very same Parameter objects back in ``finally``.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .arch import UNET_PREFIX, DiTAdapter, detect_kind
from .edit import Change, Edit
from .errors import InvalidInputError, NonFiniteError
from .hosts import RunContext
from .hooks import DIT_PRE_NORMS, copy_norm_inputs

log = logging.getLogger(__name__)

# Which weights each trainable-parameter set covers (names inside the diffusion model).
PARAM_SETS = ("lora", "lora-xattn", "xattn", "noxattn")


def _is_linear(mod: torch.nn.Module) -> bool:
    """A Linear layer, also one that is not a `torch.nn.Linear` subclass: ComfyUI's mixed-precision
    ops (quantized checkpoints, 0.3.7x) are plain Modules holding a 2-D weight (QuantizedTensor or
    float) and in/out features, and every Linear of such a model is one."""
    if isinstance(mod, torch.nn.Linear):
        return True
    w = getattr(mod, "weight", None)
    return (isinstance(w, torch.Tensor) and w.ndim == 2 and hasattr(mod, "in_features")
            and hasattr(mod, "out_features") and tuple(w.shape) == (mod.out_features, mod.in_features))


def _is_adaptable(mod: torch.nn.Module) -> bool:
    return _is_linear(mod) or isinstance(mod, torch.nn.Conv2d)


def select_targets(modules: Mapping[str, torch.nn.Module], param_set: str) -> list[str]:
    """Module names a parameter set trains.

    - ``lora``: every Linear inside the transformer blocks (attn1, attn2, FFN): the usual LoRA targets;
    - ``lora-xattn`` and ``xattn`` (ESD-x): the cross-attention projections ``attn2.*``;
    - ``noxattn`` (ESD-u): every Linear/Conv2d except cross-attention, the time embedding and the
      final ``out`` layer (as ESD's reference code excludes them).
    """
    if param_set not in PARAM_SETS:
        raise InvalidInputError(f"unknown trainable parameter set {param_set!r}; choose one of {', '.join(PARAM_SETS)}")
    out = []
    adapter = dit_adapter(modules)
    for name, mod in modules.items():
        if not name or not _is_adaptable(mod):
            continue
        if adapter is not None:
            ok = _dit_target(adapter, name, mod, param_set)
        elif param_set == "lora":
            ok = ".transformer_blocks." in name and _is_linear(mod)
        elif param_set in ("lora-xattn", "xattn"):
            ok = ".attn2." in name and _is_linear(mod)
        else:
            ok = ".attn2." not in name and not name.startswith(("time_embed", "out.", "label_emb"))
        if ok:
            out.append(name)
    if not out:
        raise InvalidInputError(f"the parameter set {param_set!r} matched no layer of this "
                                f"{adapter.label if adapter is not None else 'UNet'}")
    return out


def dit_adapter(modules: Mapping[str, torch.nn.Module]) -> DiTAdapter | None:
    """The DiT adapter of a diffusion model's modules (`editing.arch.dit`), None for a UNet (a module
    tree with attn2 cross-attention) or for no known kind."""
    names = [n for n in modules if n]
    if any(".attn2" in n for n in names):
        return None
    # the modules that hold weights themselves, as a checkpoint's keys name them (HunyuanImage's txt_in
    # is a container, Flux's the Linear itself)
    own = [n for n in names if next(modules[n].parameters(recurse=False), None) is not None]
    return detect_kind([n + ".weight" for n in own])[0]


def _dit_target(adapter: DiTAdapter, name: str, mod: torch.nn.Module, param_set: str) -> bool:
    """`select_targets` on a DiT: ``lora`` = every Linear in its transformer blocks,
    ``lora-xattn``/``xattn`` = the attention where image and text tokens meet (the adapter's: Flux's
    and SD3's joint attention, Wan's and PixArt's cross-attention, Lumina's single-stream attention),
    ``noxattn`` = the blocks' other Linears (the embedders and the final layer are never trained, as
    ESD-u leaves time_embed/out)."""
    if not _is_linear(mod) or not adapter.in_blocks(name):
        return False
    if param_set == "lora":
        return True
    attn = adapter.is_attention(name)
    return attn if param_set in ("lora-xattn", "xattn") else not attn


def _weight(mod: torch.nn.Module) -> torch.Tensor:
    return mod.weight


@dataclass
class _Slot:
    name: str
    kind: str                       # "lora" | "full"
    module: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    scale: float = 1.0
    keep: torch.Tensor | None = None  # full only: 1 where the weight may change (pruned zeros stay 0)


class Adapters:
    """Trainable (and fixed) weight changes on named modules of a frozen network.

    ``fixed`` maps module name -> a dense ΔW always added (e.g. the edit under audit).
    Use `attached()` around forwards; `enabled = False` gives the network without the trainable part
    (the fixed part stays), `fixed_enabled = False` drops the fixed part too (the frozen original).
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], names: Iterable[str], *, kind: str = "lora",
                 rank: int = 4, alpha: float | None = None, seed: int = 0, device=None,
                 fixed: Mapping[str, torch.Tensor] | None = None, keep_zeros: bool = False):
        if kind not in ("lora", "full"):
            raise InvalidInputError(f"adapter kind must be 'lora' or 'full', not {kind!r}")
        if kind == "lora" and rank < 1:
            raise InvalidInputError("LoRA rank must be at least 1")
        self.kind, self.rank = kind, rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.enabled = True
        self.fixed_enabled = True
        self.slots: dict[str, _Slot] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        self._modules = {n: modules[n] for n in set(names) | set(fixed or {}) if n in modules}
        g = torch.Generator().manual_seed(seed)
        for name in names:
            mod = modules.get(name)
            if mod is None or not _is_adaptable(mod):
                raise InvalidInputError(f"no Linear/Conv2d module named {name!r} in the UNet")
            w = _weight(mod)
            dev = device or w.device
            with torch.inference_mode(False):
                if kind == "lora":
                    if not _is_linear(mod):
                        raise InvalidInputError(f"{name}: LoRA adapters train Linear layers only; use a full set")
                    out_f, in_f = w.shape
                    # A random (Kaiming-uniform like PEFT), B zero: training starts at exactly ΔW = 0.
                    bound = 1.0 / math.sqrt(in_f)
                    down = (torch.rand(rank, in_f, generator=g) * 2 - 1) * bound
                    params = {"down": torch.nn.Parameter(down.to(dev)),
                              "up": torch.nn.Parameter(torch.zeros(out_f, rank, device=dev))}
                    self.slots[name] = _Slot(name, kind, mod, params, scale=self.alpha / rank)
                else:
                    keep = (w.detach() != 0).float().to(dev) if keep_zeros else None
                    params = {"delta": torch.nn.Parameter(torch.zeros(w.shape, device=dev))}
                    self.slots[name] = _Slot(name, kind, mod, params, keep=keep)
        for name, d in (fixed or {}).items():
            if name not in self._modules:
                raise InvalidInputError(f"the fixed edit changes {name!r}, which is not a Linear/Conv2d of this UNet")
            w = _weight(self._modules[name])
            if tuple(d.shape) != tuple(w.shape):
                raise InvalidInputError(f"{name}: fixed change of shape {tuple(d.shape)} for a weight {tuple(w.shape)}")
            with torch.inference_mode(False):
                self.fixed[name] = d.detach().to(device=w.device, dtype=torch.float32).clone()

    # ---- parameters ----------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for s in self.slots.values() for p in s.params.values()]

    def delta(self, name: str) -> torch.Tensor:
        """The trainable part's effective ΔW of one module (float32, detached)."""
        s = self.slots[name]
        with torch.no_grad():
            if s.kind == "lora":
                return (s.params["up"] @ s.params["down"]) * s.scale
            d = s.params["delta"]
            return d * s.keep if s.keep is not None else d.clone()

    # ---- hooks ---------------------------------------------------------------------------
    def _extra(self, name: str, mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        extra = None
        d = self.fixed.get(name) if self.fixed_enabled else None
        s = self.slots.get(name) if self.enabled else None
        if s is not None and s.kind == "full":
            dd = s.params["delta"] * s.keep if s.keep is not None else s.params["delta"]
            d = dd if d is None else d + dd
        if d is not None:
            extra = _apply_weight(mod, x, d)
        if s is not None and s.kind == "lora":
            h = F.linear(F.linear(x.float(), s.params["down"]), s.params["up"]) * s.scale
            extra = h if extra is None else extra + h
        return extra

    @contextmanager
    def attached(self) -> Iterator["Adapters"]:
        handles = []

        def make(name):
            def hook(mod, args, out):
                extra = self._extra(name, mod, args[0])
                return out if extra is None else out + extra.to(out.dtype)
            return hook

        try:
            for name, mod in self._modules.items():
                handles.append(mod.register_forward_hook(make(name)))
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def only_fixed(self) -> Iterator[None]:
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    @contextmanager
    def original(self) -> Iterator[None]:
        """Neither the fixed nor the trainable part: the host's model as given."""
        prev = (self.enabled, self.fixed_enabled)
        self.enabled = self.fixed_enabled = False
        try:
            yield
        finally:
            self.enabled, self.fixed_enabled = prev

    # ---- fold-back -----------------------------------------------------------------------
    def to_edit(self, method: str, family: str, **meta) -> Edit:
        """The trainable part as an Edit: ``lowrank`` Changes (up·scale, down) for LoRA slots,
        ``delta`` Changes for full slots. Keys are ComfyUI patch keys."""
        changes = {}
        for name, s in self.slots.items():
            key = f"{UNET_PREFIX}{name}.weight"
            shape = tuple(_weight(s.module).shape)
            with torch.no_grad():
                if s.kind == "lora":
                    up = (s.params["up"] * s.scale).detach().float().cpu().contiguous()
                    if not bool(up.any()):
                        continue  # an untouched adapter changes nothing; keep the file small
                    changes[key] = Change("lowrank", shape, {"up": up, "down": s.params["down"].detach().float().cpu().contiguous()})
                else:
                    d = self.delta(name).float().cpu().contiguous()
                    if not bool(d.any()):
                        continue
                    changes[key] = Change("delta", shape, {"delta": d})
        edit = Edit(method=method, family=family, changes=changes, **meta)
        edit.check_finite()
        return edit


def _apply_weight(mod: torch.nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The module's weight-only operator applied with weight ``d`` (no bias)."""
    if isinstance(mod, torch.nn.Conv2d):
        return F.conv2d(x.float(), d.float(), None, mod.stride, mod.padding, mod.dilation, mod.groups)
    return F.linear(x.float(), d.float())


def module_name(key: str) -> str:
    """ComfyUI patch key -> module name inside the diffusion model."""
    if not key.startswith(UNET_PREFIX) or not key.endswith(".weight"):
        raise InvalidInputError(f"{key} is not a UNet weight key; the trainers handle UNet edits only")
    return key[len(UNET_PREFIX):-len(".weight")]


def edit_as_fixed(edits: Iterable[tuple[Edit, float]], modules: Mapping[str, torch.nn.Module],
                  base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Dense ΔW per module name of several edits (with strengths), to attach as fixed hooks.

    A mask's ΔW = −W⊙M needs W: `base` (ComfyUI key -> the unpatched weight, as `hosts.base_weights`
    gives it) is the W the edit is applied to everywhere else. Without it the module's current weight
    is used, which is only right when nothing else patches the model: a host that loads some modules
    patched and others not (ComfyUI's low-VRAM mode) would mix the two. Text-encoder changes are refused."""
    out: dict[str, torch.Tensor] = {}
    for edit, strength in edits:
        for key, change in edit.changes.items():
            name = module_name(key)
            mod = modules.get(name)
            if mod is None or not _is_adaptable(mod):
                raise InvalidInputError(f"the {edit.method} edit changes {key}, which this UNet has no Linear/Conv2d for")
            w = _weight(mod)
            with torch.inference_mode(False):
                ref = None
                if change.kind == "mask":
                    ref = (base[key] if base is not None and key in base else w).detach().float().to(w.device)
                d = change.delta(ref, dtype=torch.float32, device=w.device)
                d = d.reshape(w.shape) * strength
                out[name] = out[name] + d if name in out else d
    return out


@contextmanager
def frozen_session(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Make the UNet usable in a backward pass without changing it.

    Inference-tensor parameters/buffers are swapped for plain clones with ``requires_grad=False``;
    in ``finally`` the original objects are put back, so the host's weights are bit-identical and
    identical objects afterwards (also on error or Cancel)."""
    swapped: list[tuple[torch.nn.Module, str, str, torch.Tensor]] = []
    flags: list[tuple[torch.nn.Parameter, bool]] = []
    handles = []
    try:
        handles = copy_norm_inputs(unet, ("norm1", "norm2", "norm3") + DIT_PRE_NORMS)  # ComfyUI's in-place residuals
        with torch.inference_mode(False):
            for mod in unet.modules():
                for pname, p in list(mod._parameters.items()):
                    if p is None:
                        continue
                    if p.is_inference():
                        swapped.append((mod, "_parameters", pname, p))
                        mod._parameters[pname] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    elif p.requires_grad:
                        flags.append((p, True))
                        p.requires_grad_(False)
                for bname, b in list(mod._buffers.items()):
                    if b is not None and b.is_inference():
                        swapped.append((mod, "_buffers", bname, b))
                        mod._buffers[bname] = b.detach().clone()
        yield unet
    finally:
        for h in handles:
            h.remove()
        for mod, where, name, orig in reversed(swapped):
            getattr(mod, where)[name] = orig
        for p, flag in flags:
            p.requires_grad_(flag)


# ---- the training-loop skeleton ------------------------------------------------------------------
Record = Mapping[str, "float | Sequence[float] | None"]


@dataclass
class TrainLog:
    """What a training loop leaves: per-key histories, steps done and the seconds they took."""
    history: dict[str, list] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    @property
    def steps_per_s(self) -> float:
        return round(self.steps / max(self.seconds, 1e-9), 3)


def _finite(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v is None or math.isfinite(float(v)) for v in values)


def train_loop(n_steps: int, step: Callable[[int], Record], ctx: RunContext, *, what: str, hint: str,
               log: TrainLog | None = None, total: int | None = None,
               on_step: Callable[[int], None] | None = None) -> TrainLog:
    """Run `step(i)` for the next `n_steps` steps (i counts on from `log.steps`, so a loop may run
    in stretches, as the audit's checkpoints do). Before each step Cancel is checked; each step
    returns the values to record ({"forget": 0.41, "retain": None, ...}; a value may be a list such
    as [step, loss]); a NaN/Inf stops the run with an error that names `what`, the step and `hint`
    (what to change). Progress goes to ``ctx.report(done, total)`` or to `on_step(done)`."""
    log = log or TrainLog()
    total = total if total is not None else log.steps + n_steps
    t0 = time.perf_counter()
    try:
        for _ in range(n_steps):
            ctx.check()
            i = log.steps
            record = step(i)
            for key, value in record.items():
                if not _finite(value):
                    raise NonFiniteError(f"{what}: {key!r} became NaN/Inf ({value}) at step {i}; {hint}; "
                                         "nothing was applied")
                log.history.setdefault(key, []).append(value)
            log.steps += 1
            if on_step is not None:
                on_step(log.steps)
            else:
                ctx.report(log.steps, total)
    finally:
        log.seconds += time.perf_counter() - t0
    return log

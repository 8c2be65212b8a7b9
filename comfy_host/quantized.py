"""Quantized weights as ComfyUI holds them: read exactly (dequantized) for the methods, and the
rounding that storing a patched weight back adds, for the apply report.

The forms ComfyUI (and ComfyUI-GGUF) load a diffusion model or text encoder in:

- plain float8 (``weight_dtype`` fp8_e4m3fn / fp8_e5m2): the value is the float8 number itself;
  `manual_cast` ops upcast it per forward.
- scaled fp8 checkpoints (a ``scaled_fp8`` marker key): a float8 weight with a per-layer
  ``scale_weight`` beside it, W = q · s (`comfy.ops.scaled_fp8_ops.convert_weight`).
- ComfyUI's `QuantizedTensor` (`comfy.quant_ops`, 0.3.7x mixed-precision checkpoints): its own
  ``dequantize()`` is the value it computes with.
- GGUF (ComfyUI-GGUF's GGMLTensor: packed blocks with ``tensor_type`` and ``tensor_shape``): the
  `gguf` package's ``quants.dequantize``, which ComfyUI-GGUF itself depends on.

The methods compute from these values in float (`FloatWeights`), and the stored tensors stay at
hand for applying, where ComfyUI patches each form its own way: float8 and scaled fp8 as W + ΔW in
float32 rounded back (stochastically in current versions), a QuantizedTensor re-quantized with a
new scale, a GGUF weight patched on the fly at every forward on its dequantized value.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from ..editing.edit import Edit
from ..editing.errors import InvalidInputError

FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, n))
PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Above this, more than half of the edit's norm is lost to the storage's rounding.
LOST_IN_ROUNDING = 0.5
_SCALE_SUFFIX = "scale_weight"  # scaled fp8: ComfyUI's per-layer scale, beside the layer's weight


@functools.lru_cache(maxsize=1)
def _quantized_tensor_class() -> type | None:
    """ComfyUI's QuantizedTensor, or None in a ComfyUI without `comfy.quant_ops` (before 0.3.7x)."""
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:
        return None
    return QuantizedTensor


def storage_kind(w: torch.Tensor) -> str:
    """"float" (float16/bfloat16/float32/float64), "float8", "quantized_tensor" (ComfyUI's),
    "gguf" (packed GGUF blocks) or "unknown" (integers with no scale this pack can read)."""
    qt = _quantized_tensor_class()
    if qt is not None and isinstance(w, qt):
        return "quantized_tensor"
    if w.dtype in PLAIN_FLOATS:  # GGUF's F32/F16 tensors too: plain torch floats with a tensor_type
        return "float"
    if hasattr(w, "tensor_type") and hasattr(w, "tensor_shape"):
        return "gguf"
    if w.dtype in FLOAT8:
        return "float8"
    return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def stored_type(w: torch.Tensor, scale: torch.Tensor | None = None) -> str:
    """How `w` is stored, for messages: "float16", "float8_e4m3fn", "scaled float8_e4m3fn",
    "QuantizedTensor TensorCoreFP8Layout (float8_e4m3fn)", "GGUF Q8_0", "uint8 (integer)"."""
    kind = storage_kind(w)
    if kind == "quantized_tensor":
        return f"QuantizedTensor {getattr(w, 'layout_type', '?')} ({_dtype_name(w.dtype)})"
    if kind == "gguf":
        return f"GGUF {getattr(w.tensor_type, 'name', w.tensor_type)}"
    name = _dtype_name(w.dtype)
    if kind == "unknown":
        return f"{name} (integer)"
    return f"scaled {name}" if scale is not None else name


def is_quantized(w: torch.Tensor) -> bool:
    """Whether `w` is stored in a form other than float16/bfloat16/float32/float64."""
    return storage_kind(w) != "float"


def _plain(w: torch.Tensor) -> torch.Tensor:
    """`w` as a plain torch.Tensor (a GGUF tensor's own `to`/`detach` keep its class and attributes)."""
    return w.as_subclass(torch.Tensor) if type(w) not in (torch.Tensor, torch.nn.Parameter) else w


def _gguf_dequantized(w: torch.Tensor) -> torch.Tensor:
    try:
        from gguf.quants import dequantize
    except ImportError as e:
        raise InvalidInputError(
            f"this model holds weights as {stored_type(w)}: reading them exactly needs the `gguf` Python package "
            "(ComfyUI-GGUF needs it too): install it with ComfyUI's Python (pip install gguf)") from e
    raw = _plain(w).detach().cpu().numpy()
    values = torch.from_numpy(dequantize(raw, w.tensor_type)).reshape(tuple(w.tensor_shape))
    return values.to(device=w.device, dtype=torch.float32)


def dequantized(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The exact value of a stored weight as a float32 tensor on its device (a QuantizedTensor's
    in its compute dtype first, the value ComfyUI computes with). `scale`: a scaled-fp8 layer's
    ``scale_weight`` (W = q · s). Raises when no exact read exists."""
    kind = storage_kind(w)
    if kind == "quantized_tensor":
        out = w.dequantize().to(torch.float32)
    elif kind == "gguf":
        out = _gguf_dequantized(w)
    elif kind in ("float", "float8"):
        out = _plain(w).detach().to(torch.float32)
    else:
        raise InvalidInputError(
            f"a weight of this model is stored as {stored_type(w)}, quantized without a scale this pack can "
            "read, so it cannot be edited exactly: load the float checkpoint (safetensors, float16/bfloat16), "
            "or a float8, scaled-fp8, ComfyUI-quantized or GGUF one")
    if scale is not None:
        out = out * scale.detach().to(device=out.device, dtype=torch.float32)
    return out


def scales(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight key -> its scaled-fp8 ``scale_weight`` (ComfyUI keeps it as a parameter of the layer)."""
    out = {}
    for key, s in stored.items():
        if key.endswith("." + _SCALE_SUFFIX):
            weight_key = key[:-len(_SCALE_SUFFIX)] + "weight"
            if weight_key in stored:
                out[weight_key] = s
    return out


class FloatWeights(Mapping[str, torch.Tensor]):
    """Key -> the unpatched weight as a float tensor: the stored tensor itself when it is
    float16/bfloat16/float32, its exact float32 value (`dequantized`) on every read otherwise, so a
    quantized model is never held in float32 as a whole. `stored` and `scales` keep what ComfyUI
    holds, for applying and for the rounding report."""

    def __init__(self, stored: Mapping[str, torch.Tensor]):
        self.stored = dict(stored)
        self.scales = scales(self.stored)

    def __getitem__(self, key: str) -> torch.Tensor:
        w = self.stored[key]
        scale = self.scales.get(key)
        if scale is None and (not is_quantized(w) or (storage_kind(w) == "unknown" and not key.endswith("weight"))):
            return w  # a float weight, or an integer buffer that is no weight (ids, counters): as stored
        return dequantized(w, scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> logical shape, without dequantizing (a GGUF tensor's is its `tensor_shape`)."""
        return {k: tuple(getattr(w, "tensor_shape", None) or w.shape) for k, w in self.stored.items()}

    def stored_type(self, key: str) -> str:
        return stored_type(self.stored[key], self.scales.get(key))


def weight_shapes(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of any weight mapping (a `FloatWeights` without reading its values)."""
    if isinstance(weights, FloatWeights):
        return weights.shapes()
    return {k: tuple(v.shape) for k, v in weights.items()}


# ---- rounding back to the stored type ------------------------------------------------------------
def restored(stored: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """`target` (a patched weight in float) stored the way `stored` is, by round-to-nearest, read back
    as float32: float8 clamped to its range and cast (divided by the scale first when scaled), a
    QuantizedTensor re-quantized with a fresh scale by its own layout (as ComfyUI's set_weight does),
    a GGUF weight unchanged (ComfyUI-GGUF adds patches at each forward, nothing is re-quantized)."""
    target = target.detach().to(torch.float32)
    kind = storage_kind(stored)
    if kind == "gguf":
        return target
    if kind == "quantized_tensor":
        qt = _quantized_tensor_class()
        return qt.from_float(target, stored.layout_type, scale=None, dtype=stored.dtype).dequantize().to(torch.float32)
    if kind == "unknown":
        raise InvalidInputError(f"no rounding rule for weights stored as {stored_type(stored)}")
    s = scale.detach().to(device=target.device, dtype=torch.float32) if scale is not None else None
    x = target / s if s is not None else target
    if kind == "float8":
        big = torch.finfo(stored.dtype).max
        x = x.clamp(-big, big)
    x = x.to(stored.dtype).to(torch.float32)
    return x * s if s is not None else x


def rounding_error(stored: torch.Tensor, base: torch.Tensor, delta: torch.Tensor,
                   scale: torch.Tensor | None = None) -> float | None:
    """‖round(W + ΔW) − (W + ΔW)‖ / ‖ΔW‖: how much of the edit ΔW the stored type loses when the
    patched weight is stored back (`restored`, round-to-nearest); None when ΔW is 0."""
    target = base.detach().to(torch.float32) + delta.detach().to(device=base.device, dtype=torch.float32)
    norm = float(delta.detach().double().norm())
    if norm == 0.0:
        return None
    return float((restored(stored, target, scale).double() - target.double()).norm()) / norm


def saturated(stored: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None) -> int:
    """How many values of `target` lie beyond the float8 range of `stored` (divided by its scale when
    scaled): storing them back clips them. A scaled-fp8 layer keeps its scale when patched, so an
    edit that grows a weight past 448 · s saturates there; a QuantizedTensor gets a new scale."""
    if storage_kind(stored) != "float8":
        return 0
    x = target.detach().to(torch.float32)
    if scale is not None:
        x = x / scale.detach().to(device=x.device, dtype=torch.float32)
    return int((x.abs() > torch.finfo(stored.dtype).max).sum())


@dataclass(frozen=True)
class LayerRounding:
    key: str
    stored: str         # `stored_type`
    error: float        # `rounding_error`, at the strength applied
    per_forward: bool   # GGUF: patched at each forward on the dequantized weight, never re-stored
    saturated: int = 0  # values clipped to the float8 range (`saturated`)


def rounding_per_layer(edit: Edit, strength: float, weights: Sequence[Mapping[str, torch.Tensor]]
                       ) -> list[LayerRounding]:
    """`rounding_error` of every changed key whose weight is stored quantized (in a `FloatWeights`
    of `weights`), with ΔW at `strength`; keys stored in float are left out."""
    out = []
    for key, change in edit.changes.items():
        holder = next((w for w in weights if isinstance(w, FloatWeights) and key in w.stored), None)
        if holder is None:
            continue
        stored, scale = holder.stored[key], holder.scales.get(key)
        if not is_quantized(stored) and scale is None:
            continue
        if storage_kind(stored) == "gguf":
            out.append(LayerRounding(key, stored_type(stored), 0.0, True))
            continue
        base = holder[key]
        delta = change.delta(base, dtype=torch.float32, device=base.device).reshape(base.shape) * float(strength)
        err = rounding_error(stored, base, delta, scale)
        if err is not None:
            out.append(LayerRounding(key, stored_type(stored, scale), err, False, saturated(stored, base + delta, scale)))
    return out


def rounding_summary(layers: Sequence[LayerRounding]) -> list[str]:
    """Warnings for `ModelView.apply`: mean / max of the rounding error over the re-stored layers,
    and a louder one when the edit is mostly lost (max above `LOST_IN_ROUNDING`)."""
    out = []
    restored_layers = [r for r in layers if not r.per_forward]
    if restored_layers:
        errs = [r.error for r in restored_layers]
        kinds = ", ".join(sorted({r.stored for r in restored_layers}))
        mean, worst = sum(errs) / len(errs), max(errs)
        out.append(f"weights stored as {kinds}: the patched weight is rounded back to that type; rounding error "
                   f"‖round(W+ΔW) − (W+ΔW)‖/‖ΔW‖ = {mean:.3f} mean, {worst:.3f} max over {len(errs)} edited "
                   "layers (deterministic round-to-nearest; ComfyUI 0.3.x rounds stochastically, unbiased but "
                   "about √2 times as large)")
        clipped = [r for r in restored_layers if r.saturated]
        if clipped:
            out.append(f"{sum(r.saturated for r in clipped)} edited values in {len(clipped)} layers lie beyond the "
                       "float8 range of their layer's scale and are clipped to it (a scaled-fp8 layer keeps its scale)")
        lost = [r for r in restored_layers if r.error > LOST_IN_ROUNDING]
        if lost:
            worst_key = max(lost, key=lambda r: r.error).key
            out.append(f"WARNING: in {len(lost)} of {len(errs)} layers the rounding error exceeds "
                       f"{LOST_IN_ROUNDING:g} of the edit (worst {worst:.2f}, {worst_key}): most of the edit is lost "
                       "in rounding. Load the model in bf16/fp16 (weight_dtype 'default') to apply it.")
    gguf = [r for r in layers if r.per_forward]
    if gguf:
        kinds = ", ".join(sorted({r.stored for r in gguf}))
        out.append(f"{len(gguf)} edited layers stored as {kinds}: ComfyUI-GGUF adds the edit at each forward to "
                   "the dequantized weight, nothing is rounded back")
    return out

"""A ComfyUI MODEL/CLIP's weights as the library reads them (unpatched, dequantized), its layout and
fingerprint, and an `Edit` as ComfyUI patches on clones (the inputs are never modified)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..editing.arch import Family, discover_layout, fingerprint
from ..editing.edit import Edit
from ..editing.errors import ConceptEditError, InvalidInputError
from .quantized import FloatWeights, dequantized, is_quantized


# ---- weights ---------------------------------------------------------------------------------
def stored_weights(patcher) -> dict[str, torch.Tensor]:
    """Key -> the *unpatched* weight as ComfyUI stores it (float, float8, a QuantizedTensor, a GGUF
    tensor; a loaded clone may have patched weights in place, whose originals are in its backup)."""
    import comfy.utils
    sd = patcher.model_state_dict()
    backup = getattr(patcher, "backup", None) or {}
    out = {}
    for k, w in sd.items():
        b = backup.get(k)
        if b is not None:
            out[k] = getattr(b, "weight", b)
        elif w.device.type == "meta":
            # ComfyUI-GGUF's layers put meta stand-ins in the state dict (for memory estimates); the
            # packed weight is the module's own parameter, unpatched (its patches ride beside it)
            try:
                out[k] = comfy.utils.get_attr(patcher.model, k)
            except AttributeError:  # a stand-in with no parameter behind it ("temp.weight")
                continue
        else:
            out[k] = w
    return out


def original_weights(patcher) -> FloatWeights:
    """Key -> the *unpatched* weight as a float tensor: as stored when float16/bfloat16/float32,
    dequantized exactly on each read when stored quantized (`quantized.FloatWeights`, which keeps the
    stored tensors for applying)."""
    return FloatWeights(stored_weights(patcher))


def model_family(model, clip=None) -> Family:
    """The layout read from this MODEL (and its CLIP's text encoders when given): its keys and
    shapes, with ComfyUI's own UNet config for diffusers names when no table names the layout."""
    # logical shapes of the stored weights (a GGUF tensor's packed shape is not its weight's)
    shapes = FloatWeights(stored_weights(model)).shapes()
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    text = {k: tuple(v.shape) for k, v in clip.patcher.model_state_dict().items()} if clip is not None else None
    return discover_layout(shapes, unet_config=config, text_shapes=text)


def model_fingerprint(model) -> dict:
    return fingerprint(model_family(model), original_weights(model))


def clip_state(clip) -> FloatWeights:
    return original_weights(clip.patcher)


def add_edit_patches(model, clip, edit: Edit, unet_w: Mapping[str, torch.Tensor], te_w: Mapping[str, torch.Tensor],
                     strength: float = 1.0):
    """(model', clip'): clones carrying `edit` as patches (an input is returned as it is when the
    edit has no key of it); `unet_w`/`te_w` are the unpatched weights masks are resolved against.
    Every patch must match a key, else nothing is returned. At strength 0 the clones carry no patch,
    as ComfyUI's LoraLoader adds none: a weight stored in float8 would otherwise be rounded again
    (stochastically in current ComfyUI, which moves some exact values by a step)."""
    patches = edit_patches(edit, {k: (te_w[k] if k in te_w else unet_w[k]) for k in edit.changes})
    unet_patches = {k: p for k, p in patches.items() if k not in te_w}
    te_patches = {k: p for k, p in patches.items() if k in te_w}
    if strength == 0:
        return (model.clone() if unet_patches else model), (clip.clone() if te_patches else clip)
    out_model, out_clip = model, clip
    if unet_patches:
        out_model = model.clone()
        got = set(out_model.add_patches(unet_patches, strength))
        _check_matched(unet_patches, got, "MODEL")
    if te_patches:
        out_clip = clip.clone()
        got = set(out_clip.add_patches(te_patches, strength))
        _check_matched(te_patches, got, "CLIP")
    return out_model, out_clip


def patched_weights(patcher, keys: Sequence[str], base: Mapping[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Key -> the weight this MODEL computes with (its unpatched weight plus its own patches), in
    float32, by ComfyUI's own patch arithmetic, whatever is loaded where: a low-VRAM load keeps some
    modules unpatched and patches them per forward, so reading module weights would mix the two."""
    import comfy.lora
    base = base if base is not None else original_weights(patcher)
    calc = getattr(comfy.lora, "calculate_weight", None)  # current ComfyUI; 2024 has the patcher method
    out = {}
    for k in keys:
        w = base[k].detach().to(device="cpu", dtype=torch.float32, copy=True)
        ps = patcher.patches.get(k)
        if ps:
            w = calc(ps, w, k) if calc is not None else patcher.calculate_weight(ps, w, k)
        out[k] = w
    return out


_PATCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _module_name(key: str) -> str:
    return key[:-len(".weight")] if key.endswith(".weight") else key


def edit_state_dict(edit: Edit, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(kohya-style state dict, key map) of `edit` for `comfy.lora.load_lora`: per changed key a
    module named after the key, low-rank changes as ``lora_up``/``lora_down`` with ``alpha`` = rank
    (scale 1), dense deltas as ``diff`` (their own float dtype, never the weight's), masks as a
    sparse COO ``diff`` of −W⊙M. `weights` maps each changed key to its base weight as a float tensor
    (masks need its values; a quantized one is dequantized here; nothing else is read).

    Weights stored quantized take the same patches as a LoRA: ComfyUI adds W + ΔW in float32 and
    stores the sum back in the weight's type (float8 and scaled fp8 rounded, stochastically in
    current versions; a QuantizedTensor re-quantized; GGUF patched at each forward), so the edit
    arrives less what that rounding loses (`quantized.rounding_per_layer` measures it)."""
    sd: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    for key, change in edit.changes.items():
        base = weights[key]
        if change.kind == "mask" and is_quantized(base):
            base = dequantized(base)
        name = _module_name(key)
        if name in key_map:
            raise InvalidInputError(f"two keys of the edit name the module {name}")
        key_map[name] = key
        if change.kind == "lowrank":
            up, down = change.tensors["up"], change.tensors["down"]
            sd[f"{name}.lora_up.weight"] = up if up.dtype in _PATCH_FLOATS else up.float()
            sd[f"{name}.lora_down.weight"] = down if down.dtype in _PATCH_FLOATS else down.float()
            sd[f"{name}.alpha"] = torch.tensor(float(up.shape[1]))  # the loader's scale alpha / rank = 1
        elif change.kind == "mask":
            # −W⊙M as a sparse COO diff: memory O(pruned weights), not O(layer) (SDXL has 70 1280×5120
            # layers); its values are the weights themselves, so W + ΔW is exactly 0 where pruned.
            sd[f"{name}.diff"] = change.sparse_delta(base).to(device="cpu")
        else:
            d = change.tensors["delta"]
            sd[f"{name}.diff"] = d if d.dtype in _PATCH_FLOATS else d.float()
    return sd, key_map


def edit_patches(edit: Edit, weights: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """`edit` as ComfyUI patches keyed by patch key, made by the running ComfyUI's own LoRA loader
    (`comfy.lora.load_lora`, the route LoraLoader takes): ("lora", …) tuples in the 2024 copy,
    `comfy.weight_adapter` objects in current ComfyUI. Low-rank changes stay low-rank (an SDXL rank-4
    LoRA is never expanded to its dense ΔW); ComfyUI multiplies them out per weight when it loads the
    model, in float32, and rounds the sum once to the weight's dtype."""
    import comfy.lora
    sd, key_map = edit_state_dict(edit, weights)
    patches = comfy.lora.load_lora(sd, key_map)
    missing = [k for k in key_map.values() if k not in patches]
    if missing:
        raise ConceptEditError(f"ComfyUI's LoRA loader turned {len(missing)} of the edit's {len(key_map)} changes "
                               f"into no patch (first: {missing[0]}); nothing was applied")
    return patches


def _check_matched(patches: Mapping, got: set, what: str) -> None:
    missing = [k for k in patches if k not in got]
    if missing:
        raise ConceptEditError(f"{len(missing)} of {len(patches)} keys of the edit matched nothing in the {what} "
                               f"(first: {missing[0]}); nothing was applied")

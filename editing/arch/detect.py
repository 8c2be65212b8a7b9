"""A loaded model's layout, read from its keys and shapes: SD-style UNets by their attn2 blocks, DiTs
by the one adapter whose signature they match (`dit.py`). Nothing is looked up by name; a layout equal
to a table's takes that table's name and defaults."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Iterable, Mapping

from ..errors import UnknownArchitectureError
from .core import UNET_PREFIX, Family, TransformerBlock
from .dit import ADAPTERS, DiTAdapter, detect_kind, guess_kind, kind_of_variant, module_paths
from .tables import CUSTOM, FAMILIES
from .text import _edit_text_encoders, discover_text_encoders
from .unet import _ANY_BLOCK, _blocks_from_unet, _execution_order, discover_blocks


def _normalise_unet_keys(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Accept checkpoint (``model.diffusion_model.``), ComfyUI (``diffusion_model.``) or bare keys."""
    out = {}
    for k, s in shapes.items():
        if k.startswith("model.diffusion_model."):
            k = k[len("model."):]
        elif not k.startswith(UNET_PREFIX) and (k.startswith(("input_blocks.", "middle_block.", "output_blocks."))):
            k = UNET_PREFIX + k
        out[k] = tuple(s)
    return out


def _refusal(shapes: Mapping[str, tuple[int, ...]], why: str, kinds: Iterable[str] = ()) -> UnknownArchitectureError:
    kinds = list(kinds)
    if len(kinds) > 1:
        why = (f"its keys fit more than one model kind ({', '.join(kinds)}), and ConceptEdit will not guess which "
               "(a merged or converted checkpoint?)")
    mods = module_paths(k for k in shapes if k.startswith(UNET_PREFIX))
    tops = sorted({m.split(".", 1)[0] for m in mods})[:12]
    known = ", ".join(a.label for a in ADAPTERS.values())
    return UnknownArchitectureError(
        f"ConceptEdit cannot edit this model: {why}. Its diffusion model has the modules {', '.join(tops) or 'none'}. "
        f"It edits SD-style UNets whose SpatialTransformer blocks have a cross-attention attn2 (SD1.x, SD2.x, SDXL "
        f"and their finetunes) and these DiTs: {known}. If this is one of them, load it with ComfyUI's own loader "
        "(Load Checkpoint / Load Diffusion Model).")


def _dit_family(adapter: DiTAdapter, shapes: Mapping[str, tuple[int, ...]], text=(),
                unet_config: Mapping | None = None) -> Family:
    projs, mlps = adapter.parts(shapes)
    variant = adapter.variant_of(module_paths(shapes), unet_config)
    tokens = [p for p in projs if p.source == "tokens"]
    probe = Family(CUSTOM, "", tokens[0].cols if tokens else 0, (), tuple(text), kind=adapter.kind, projections=projs,
                   mlps=mlps, variant=variant.name)
    for fam in FAMILIES.values():
        if fam.kind == adapter.kind and fam.variant == variant.name and _unet_shapes(fam) == _unet_shapes(probe):
            return replace(fam, text_encoders=tuple(text) or fam.text_encoders, unet_config=dict(unet_config or {}))
    hidden = tokens[0].rows if tokens else (projs[0].rows if projs else 0)
    base = adapter.label if variant.custom_name else variant.label
    label = f"{base}-layout DiT ({len(mlps)} MLPs, hidden {hidden})"
    return replace(probe, name=variant.custom_name or variant.name, label=label, unet_config=dict(unet_config or {}),
                   native_latent=adapter.native_latent)


def _unet_shapes(fam: Family) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in fam.expected_shapes().items() if k.startswith(UNET_PREFIX)}


def discover_layout(shapes: Mapping[str, tuple[int, ...]], unet_config: Mapping | None = None,
                    text_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Family:
    """The layout of a loaded model from its diffusion-model keys and shapes (``{key: shape}``;
    checkpoint, ComfyUI or bare key names). `unet_config` (ComfyUI's, as `comfy.model_detection`
    makes it) gives diffusers names to a UNet no table names and must agree with a DiT's kind;
    `text_shapes` (a CLIP state dict's shapes) gives the text encoders, else a table's are used
    when the model equals that table's."""
    shapes = _normalise_unet_keys(shapes)
    blocks = discover_blocks(shapes)
    text = discover_text_encoders(text_shapes) if text_shapes else ()
    if not blocks:
        adapter, kinds = detect_kind([k for k in shapes if k.startswith(UNET_PREFIX)], unet_config)
        if adapter is None:
            raise _refusal(shapes, "it has no transformer block with a cross-attention attn2 and is none of the "
                                   "DiTs ConceptEdit knows", kinds)
        return _dit_family(adapter, shapes, text, unet_config)
    contexts = sorted({shapes[f"{UNET_PREFIX}{b.ldm}.attn2.to_k.weight"][1] for b in blocks})
    if len(contexts) != 1:
        raise _refusal(shapes, f"its cross-attention blocks read text of different widths {contexts}")
    context = int(contexts[0])
    probe = Family(CUSTOM, "", context, blocks, ())
    unet_exp = probe.expected_shapes()
    for fam in FAMILIES.values():
        if fam.kind != "unet":
            continue
        exp = {k: v for k, v in fam.expected_shapes().items() if k.startswith(UNET_PREFIX)}
        if exp == unet_exp:
            if text and [(t.name, t.width, t.layers) for t in text] != \
                    [(t.name, t.width, t.layers) for t in fam.text_encoders]:
                return replace(fam, text_encoders=text)
            return fam
    if unet_config:
        try:
            named = {b.ldm: b.diffusers for b in _blocks_from_unet(unet_config)}
        except (KeyError, TypeError, IndexError, ValueError):
            named = {}
        if set(named) == {b.ldm for b in blocks}:
            blocks = tuple(replace(b, diffusers=named[b.ldm]) for b in blocks)
    adm = any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes)
    label = f"custom UNet ({len(blocks)} cross-attention blocks, text width {context})"
    return Family(CUSTOM, label, context, blocks, text, dict(unet_config or {}), native_latent=128 if adm else 64)


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """The layout of these diffusion-model shapes (see `discover_layout`)."""
    return discover_layout(shapes)


def dit_kind(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The DiT adapter's kind these (normalised) keys are, else None."""
    adapter, _ = detect_kind([k for k in shapes if k.startswith(UNET_PREFIX)])
    return adapter.kind if adapter is not None else None


def layout_of_edit(family: str, keys: Mapping[str, tuple[int, ...]], encoders: Iterable[str] = ()) -> Family:
    """The layout an edit's own keys describe, for naming its keys (LoRA export, diffusers, the web
    view) without the model: the table's when `family` is one; a DiT variant's when `family` names
    one ("qwen-image"); else the blocks, projections and text encoders the keys name. `encoders`
    lists the model's text encoders (the fingerprint records them), which decide kohya's
    ``lora_te`` vs ``lora_te1/2``."""
    if family in FAMILIES:
        return FAMILIES[family]
    shapes = dict(keys)
    norm = _normalise_unet_keys(shapes)
    unet_keys = [k for k in norm if k.startswith(UNET_PREFIX)]
    adapter = kind_of_variant(family) if family and family != CUSTOM else None
    if adapter is None and unet_keys and not discover_blocks(norm):
        adapter = guess_kind(unet_keys) if not any(_ANY_BLOCK.match(k) for k in unet_keys) else None
    if adapter is not None:
        projs, mlps = adapter.parts(norm)
        variant = adapter.variant(family) or adapter.variants[-1]
        return Family(family or CUSTOM, f"{family or CUSTOM} layout", 0, (), _edit_text_encoders(shapes, encoders),
                      kind=adapter.kind, projections=projs, mlps=mlps, variant=variant.name)
    blocks = list(discover_blocks(norm))
    seen = {b.ldm for b in blocks}
    for k, s in shapes.items():  # blocks the edit touches only outside attn2 K/V (FFN masks, LoRAs)
        m = _ANY_BLOCK.match(k)
        if m and m.group(1) not in seen and len(s) >= 1:
            seen.add(m.group(1))
            blocks.append(TransformerBlock(m.group(1), "", int(s[0])))
    blocks = tuple(sorted(blocks, key=lambda b: _execution_order(b.ldm)))
    text = _edit_text_encoders(shapes, encoders)
    ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), 0)
    return Family(family or CUSTOM, f"{family or CUSTOM} layout", int(ctx), blocks, text)


def fingerprint(family: Family, state: Mapping[str, "object"]) -> dict:
    """A base-model fingerprint: the family, a hash of the discovered layout (every editable
    diffusion-model key and its shape), and a coarse hash of a few weight values (which checkpoint),
    robust to the dtype the model was loaded in. `state` maps ComfyUI keys to tensors."""
    exp = {k: v for k, v in family.expected_shapes().items() if k.startswith(UNET_PREFIX)}
    layout = hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in exp.items())).encode()).hexdigest()[:16]
    probe = []
    for key in family.attn2_kv_keys()[:4] + family.ffn_out_keys()[:2] + family.projection_keys() + \
            [m.key for m in family.mlps[:2]]:
        w = state.get(key)
        if w is None:
            continue
        v = _float_view(w).reshape(-1)[:4096].double().abs().sum().item()
        probe.append(f"{key}={v:.3g}")
    weights = hashlib.sha256("|".join(probe).encode()).hexdigest()[:16] if probe else ""
    out = {"family": family.name, "layout": layout, "weights": weights, "layout_version": "2"}
    if family.text_encoders:
        out["encoders"] = ",".join(t.name for t in family.text_encoders)
    return out


def _float_view(w):
    """A weight as floats for the fingerprint: a host's dequantized view where it has one."""
    deq = getattr(w, "dequantize", None)
    if deq is not None and not w.is_floating_point():
        return deq()
    return w.detach()

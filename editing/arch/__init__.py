"""Model layouts: which weights of a model the methods touch, by name, read from the loaded model.

- `core`: the types (`Family` = one model's layout, its transformer blocks, text encoders, text
  projections and MLPs);
- `unet`: SD-style UNets, found by their cross-attention `attn2` blocks;
- `dit` and one module per DiT kind (`flux`, `sd3`, `qwen_image`, `lumina`, `hidream`, `wan`,
  `pixart`, `hunyuan_image`, `auraflow`): where the text enters, the MLPs, the attention, the names;
- `text`: the text encoders of a CLIP; `tables`: layouts known by name; `detect`: reading a model.
Adding a DiT kind is one module here (imported below) plus its tests.
"""
from __future__ import annotations

from . import auraflow, flux, hidream, hunyuan_image, lumina, pixart, qwen_image, sd3, wan  # noqa: F401  (register)
from .core import UNET_PREFIX, DiTMLP, Family, TextEncoderSpec, TextProjection, TransformerBlock
from .detect import detect_family, discover_layout, dit_kind, fingerprint, layout_of_edit
from .dit import ADAPTERS, DiTAdapter, clip_hint, detect_kind
from .tables import CUSTOM, FAMILIES, TINY_WORLD_FAMILIES, family_label, get_family
from .text import (CLIP_G, CLIP_H, CLIP_L, CLIP_L_XL, T5_XXL, TINY_CLIP, TINY_T5, discover_text_encoders)
from .unet import SD1_UNET, SD2_UNET, SDXL_UNET, TINY_UNET, _blocks_from_unet, discover_blocks


def dit_to_diffusers(family: Family, module_param: str) -> str:
    """A DiT's ComfyUI module path (no prefix, with .weight) -> the diffusers transformer's name."""
    return family.adapter.diffusers_name(module_param, family.label, family.variant)


__all__ = ["ADAPTERS", "CLIP_G", "CLIP_H", "CLIP_L", "CLIP_L_XL", "CUSTOM", "DiTAdapter", "DiTMLP", "FAMILIES", "Family",
           "SD1_UNET", "SD2_UNET", "SDXL_UNET", "T5_XXL", "TINY_CLIP", "TINY_T5", "TINY_UNET", "TINY_WORLD_FAMILIES",
           "TextEncoderSpec", "TextProjection", "TransformerBlock", "UNET_PREFIX", "_blocks_from_unet", "clip_hint",
           "detect_family",
           "detect_kind", "discover_blocks", "discover_layout", "discover_text_encoders", "dit_kind", "dit_to_diffusers",
           "family_label", "fingerprint", "get_family", "layout_of_edit"]

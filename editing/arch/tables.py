"""The tables: layouts ConceptEdit knows by name (SD1.x, SD2.x, SDXL, Flux.1, SD3, the project's tiny
models). A loaded model is never looked up here; its layout is read off its keys (`detect.py`) and
takes a table's name, diffusers names and defaults (EMCID's layers, native size) when it equals
that table's layout."""
from __future__ import annotations

from dataclasses import replace

from ..errors import UnknownArchitectureError
from .core import KNOWN_NAMES, UNET_PREFIX, Family
from . import flux, qwen_image, sd3  # noqa: F401  (registers the adapters the tables read)
from .dit import ADAPTERS
from .text import CLIP_G, CLIP_H, CLIP_L, CLIP_L_XL, T5_XXL, TINY_CLIP, TINY_T5
from .unet import SD1_UNET, SD2_UNET, SDXL_UNET, TINY_UNET, _blocks_from_unet

CUSTOM = "custom"
# The families trained on the bundled tiny world (its prompts, classifier and defaults apply)
TINY_WORLD_FAMILIES = ("tiny", "tiny-flux", "tiny-qwen-image")


def _flux_table(name: str, label: str, hidden: int, context: int, vec: int, depth: int, single: int,
                mlp: int, native: int, text) -> Family:
    shapes = {f"{UNET_PREFIX}txt_in.weight": (hidden, context), f"{UNET_PREFIX}vector_in.in_layer.weight": (hidden, vec),
              f"{UNET_PREFIX}double_blocks.0.img_attn.qkv.weight": (3 * hidden, hidden)}
    shapes.update({f"{UNET_PREFIX}double_blocks.{i}.img_mlp.2.weight": (hidden, mlp) for i in range(depth)})
    shapes.update({f"{UNET_PREFIX}single_blocks.{i}.linear2.weight": (hidden, hidden + mlp) for i in range(single)})
    projs, mlps = ADAPTERS["flux"].parts(shapes)
    return Family(name, label, context, (), text, kind="flux", projections=projs, mlps=mlps, native_latent=native,
                  variant="flux1")


def _qwen_image_table(name: str, label: str, hidden: int, context: int, depth: int, mlp: int, native: int) -> Family:
    shapes = {f"{UNET_PREFIX}txt_in.weight": (hidden, context), f"{UNET_PREFIX}txt_norm.weight": (context,)}
    shapes.update({f"{UNET_PREFIX}transformer_blocks.{i}.img_mlp.net.2.weight": (hidden, mlp) for i in range(depth)})
    projs, mlps = ADAPTERS["qwen_image"].parts(shapes)
    return Family(name, label, context, (), (), kind="qwen_image", projections=projs, mlps=mlps, native_latent=native,
                  variant="qwen-image")


def _sd3_table(name: str, label: str, hidden: int, depth: int, native: int = 128) -> Family:
    shapes = {f"{UNET_PREFIX}context_embedder.weight": (hidden, 4096), f"{UNET_PREFIX}y_embedder.mlp.0.weight": (hidden, 2048)}
    shapes.update({f"{UNET_PREFIX}joint_blocks.{i}.x_block.mlp.fc2.weight": (hidden, 4 * hidden) for i in range(depth)})
    projs, mlps = ADAPTERS["sd3"].parts(shapes)
    return Family(name, label, 4096, (), (), kind="sd3", projections=projs, mlps=mlps, native_latent=native,
                  variant="sd3")


# Flux's CLIP-L and T5 in ComfyUI's LoraLoader order (lora_te1, lora_te2) and diffusers' names
_FLUX_CLIP = "text_encoders.clip_l.transformer."
FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD1.x", 768, _blocks_from_unet(SD1_UNET), (CLIP_L,), SD1_UNET, native_latent=64),
    "sd2": Family("sd2", "SD2.x", 1024, _blocks_from_unet(SD2_UNET), (CLIP_H,), SD2_UNET, native_latent=96),
    "sdxl": Family("sdxl", "SDXL", 2048, _blocks_from_unet(SDXL_UNET), (CLIP_L_XL, CLIP_G), SDXL_UNET,
                   native_latent=128),
    "tiny": Family("tiny", "ConceptEdit tiny", TINY_UNET["context_dim"], _blocks_from_unet(TINY_UNET),
                   (TINY_CLIP,), TINY_UNET, native_latent=32),
    # Flux.1 dev and schnell share these shapes (dev adds guidance_in); SD3 medium and SD3.5 medium
    # share theirs. The tiny Flux is tiny/flux.py's.
    "flux1": _flux_table("flux1", "Flux.1", 3072, 4096, 768, 19, 38, 12288, 128,
                         (replace(CLIP_L, kohya="lora_te1", a1111=_FLUX_CLIP), T5_XXL)),
    "sd3-medium": _sd3_table("sd3-medium", "SD3 / SD3.5 medium", 1536, 24),
    "sd3.5-large": _sd3_table("sd3.5-large", "SD3.5 large", 2432, 38),
    "tiny-flux": _flux_table("tiny-flux", "ConceptEdit tiny Flux", 64, 64, 64, 2, 2, 256, 32,
                             (replace(TINY_CLIP, kohya="lora_te1", a1111=_FLUX_CLIP), TINY_T5)),
    # tiny/qwen_image.py's: Qwen-Image's layout at hidden 64, three blocks, a 64-wide Qwen2.5 text tower
    "tiny-qwen-image": _qwen_image_table("tiny-qwen-image", "ConceptEdit tiny Qwen-Image", 64, 64, 3, 256, 32),
}
KNOWN_NAMES.update(FAMILIES)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_label(name: str) -> str:
    if name in FAMILIES:
        return FAMILIES[name].label
    for a in ADAPTERS.values():
        v = a.variant(name)
        if v is not None:
            return v.label
    return f"a {name} layout"

"""SD-style UNets: every SpatialTransformer block with a cross-attention `attn2`, read off the
UNet's keys and shapes (`discover_blocks`), and the UNet configs of the tables (SD1.x, SD2.x, SDXL,
the project's tiny model) in ComfyUI's format, which also give a table's diffusers names."""
from __future__ import annotations

import re
from typing import Mapping

from .core import UNET_PREFIX, TransformerBlock


def _blocks_from_unet(cfg: Mapping) -> tuple[TransformerBlock, ...]:
    """The transformer blocks of an LDM UNet, in execution order, from a config in ComfyUI's
    format (as `comfy.model_detection` produces it): ``num_res_blocks`` per level,
    ``transformer_depth`` per input block, ``transformer_depth_output`` per output block (ComfyUI
    pops it from the end, so it is listed bottom-up), ``transformer_depth_middle``."""
    ch = cfg["model_channels"]
    mult = list(cfg["channel_mult"])
    nres = cfg["num_res_blocks"]
    nres = [nres] * len(mult) if isinstance(nres, int) else list(nres)
    depth_in = list(cfg["transformer_depth"])
    depth_out = list(cfg["transformer_depth_output"])
    blocks: list[TransformerBlock] = []
    idx = 0
    for level, m in enumerate(mult):
        for r in range(nres[level]):
            idx += 1
            for k in range(depth_in.pop(0)):
                blocks.append(TransformerBlock(f"input_blocks.{idx}.1.transformer_blocks.{k}",
                                               f"down_blocks.{level}.attentions.{r}.transformer_blocks.{k}", ch * m))
        if level != len(mult) - 1:
            idx += 1  # downsample
    for k in range(cfg.get("transformer_depth_middle") or 0):
        blocks.append(TransformerBlock(f"middle_block.1.transformer_blocks.{k}",
                                       f"mid_block.attentions.0.transformer_blocks.{k}", ch * mult[-1]))
    out_idx = 0
    for up, level in enumerate(reversed(range(len(mult)))):
        for r in range(nres[level] + 1):
            for k in range(depth_out.pop()):
                blocks.append(TransformerBlock(f"output_blocks.{out_idx}.1.transformer_blocks.{k}",
                                               f"up_blocks.{up}.attentions.{r}.transformer_blocks.{k}", ch * mult[level]))
            out_idx += 1
    return tuple(blocks)


# Full UNet configs in ComfyUI's format (what comfy.model_detection reads off a checkpoint); the
# tests build the real layouts from them on the meta device.
_COMMON = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
               legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
SD1_UNET = dict(_COMMON, adm_in_channels=None, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                use_linear_in_transformer=False, context_dim=768, num_heads=8,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
SD2_UNET = dict(SD1_UNET, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64)
del SD2_UNET["num_heads"]
SDXL_UNET = dict(_COMMON, num_classes="sequential", adm_in_channels=2816, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
# The project's tiny model (see tiny/): the same block structure, small widths, 64-wide text.
# Attention at 16x16 and 8x8 only, and no input res-block at full resolution: the 32x32 level is
# what costs most to train on a CPU.
TINY_UNET = dict(_COMMON, adm_in_channels=None, model_channels=32, num_res_blocks=[0, 1, 1],
                 transformer_depth=[1, 1], channel_mult=[1, 2, 2], transformer_depth_middle=1,
                 use_linear_in_transformer=True, context_dim=64, num_head_channels=16,
                 transformer_depth_output=[0, 1, 1, 1, 1])


_ATTN2_K = re.compile(r"^diffusion_model\.(.+\.transformer_blocks\.\d+)\.attn2\.to_k\.weight$")
_ANY_BLOCK = re.compile(r"^diffusion_model\.(.+\.transformer_blocks\.\d+)\.")
_SECTIONS = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}


def _execution_order(path: str) -> tuple:
    head = path.split(".", 1)[0]
    return (_SECTIONS.get(head, 3), head, *(int(p) for p in re.findall(r"\d+", path)))


def discover_blocks(shapes: Mapping[str, tuple[int, ...]]) -> tuple[TransformerBlock, ...]:
    """Every transformer block with a cross-attention, read off the UNet's key names and shapes,
    in execution order (input blocks, middle, output blocks)."""
    blocks = []
    for key, shape in shapes.items():
        m = _ATTN2_K.match(key)
        if m is None or len(shape) != 2:
            continue
        base = f"{UNET_PREFIX}{m.group(1)}"
        v = shapes.get(f"{base}.attn2.to_v.weight")
        if v is None or tuple(v) != tuple(shape):
            continue
        ff2 = shapes.get(f"{base}.ff.net.2.weight")
        out = shapes.get(f"{base}.attn2.to_out.0.weight")
        dim = int(ff2[0]) if ff2 else int(out[0]) if out else int(shape[0])
        inner = int(ff2[1]) if ff2 and len(ff2) == 2 else -1
        geglu = f"{base}.ff.net.0.proj.weight" in shapes
        blocks.append(TransformerBlock(m.group(1), "", dim, kv=0 if shape[0] == dim else int(shape[0]),
                                       ff_inner=0 if inner == 4 * dim else inner, geglu=geglu))
    return tuple(sorted(blocks, key=lambda b: _execution_order(b.ldm)))

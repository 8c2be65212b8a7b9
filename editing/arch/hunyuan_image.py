"""HunyuanImage 2.1 (`comfy/ldm/hunyuan_video`, the HunyuanVideo class without `vector_in`): Flux-like
double and single blocks, but the text enters through a token refiner (`txt_in.input_embedder`, then
self-attention blocks over the text alone); the closed form edits `input_embedder`, the Linear that
reads Qwen2.5-VL's states."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

HUNYUAN_IMAGE = register(DiTAdapter(
    kind="hunyuan_image", label="HunyuanImage",
    signature=(r"txt_in\.input_embedder", r"double_blocks\.\d+\.img_attn\.qkv", r"single_blocks\.\d+\.linear2"),
    image_models=("hunyuan_video",),
    projections=(ProjectionRule("txt_in.input_embedder", "tokens"),),
    mlps=(MLPRule(r"double_blocks\.(\d+)\.img_mlp\.2"), MLPRule(r"single_blocks\.(\d+)\.linear2", fused=True)),
    attention=r"double_blocks\.\d+\.(?:img|txt)_attn\.(?:qkv|proj)",
    blocks=("double_blocks.", "single_blocks."),
    variants=(Variant("hunyuan-image", "HunyuanImage 2.1", "qwen_2.5_vl_7b + byt5 (DualCLIPLoader, type hunyuan_image)"),),
    native_latent=64,
))

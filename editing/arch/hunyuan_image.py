"""HunyuanImage 2.1 (`comfy/ldm/hunyuan_video`, the HunyuanVideo class without `vector_in`): Flux-like
double and single blocks, but the text enters through a token refiner (`txt_in.input_embedder`, then
self-attention blocks over the text alone); the closed form edits `input_embedder`, the Linear that
reads Qwen2.5-VL's states.

ComfyUI reads no diffusers names for HunyuanImage and diffusers has no LoRA loader in its pipeline; its
transformer (`HunyuanImageTransformer2DModel`, Flux-like names with the fused attention split) takes
a LoRA in its own names through `load_lora_adapter`. Its LoRAs keep ComfyUI's names
(``diffusion_model.double_blocks.0.img_attn.qkv``); `unet_names="diffusers"` writes the transformer's."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, fused, register

HUNYUAN_IMAGE = register(DiTAdapter(
    kind="hunyuan_image", label="HunyuanImage",
    signature=(r"txt_in\.input_embedder", r"double_blocks\.\d+\.img_attn\.qkv", r"single_blocks\.\d+\.linear2"),
    image_models=("hunyuan_video",),
    projections=(ProjectionRule("txt_in.input_embedder", "tokens"),),
    mlps=(MLPRule(r"double_blocks\.(\d+)\.img_mlp\.2"), MLPRule(r"single_blocks\.(\d+)\.linear2", fused=True)),
    attention=r"double_blocks\.\d+\.(?:img|txt)_attn\.(?:qkv|proj)",
    blocks=("double_blocks.", "single_blocks."),
    variants=(Variant("hunyuan-image", "HunyuanImage 2.1", "qwen_2.5_vl_7b + byt5 (DualCLIPLoader, type hunyuan_image)",
                      lora_names="diffusion_model"),),
    renames=((r"txt_in\.input_embedder", "context_embedder.proj_in"),
             *((rf"double_blocks\.(\d+)\.{a}", f"transformer_blocks.{{0}}.{b}")
               for a, b in (("img_mod\\.lin", "norm1.linear"), ("txt_mod\\.lin", "norm1_context.linear"),
                            ("img_attn\\.proj", "attn.to_out.0"), ("txt_attn\\.proj", "attn.to_add_out"),
                            ("img_mlp\\.0", "ff.net.0.proj"), ("img_mlp\\.2", "ff.net.2"),
                            ("txt_mlp\\.0", "ff_context.net.0.proj"), ("txt_mlp\\.2", "ff_context.net.2"))),
             (r"double_blocks\.(\d+)\.img_attn\.qkv",
              fused("transformer_blocks.{0}.attn", "to_q", "to_k", "to_v")),
             (r"double_blocks\.(\d+)\.txt_attn\.qkv",
              fused("transformer_blocks.{0}.attn", "add_q_proj", "add_k_proj", "add_v_proj")),
             (r"single_blocks\.(\d+)\.linear1",
              fused("single_transformer_blocks.{0}", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp*")),
             (r"single_blocks\.(\d+)\.linear2", "single_transformer_blocks.{0}.proj_out"),
             (r"single_blocks\.(\d+)\.modulation\.lin", "single_transformer_blocks.{0}.norm.linear")),
    native_latent=64,
))

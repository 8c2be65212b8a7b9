"""Flux's layout (`comfy/ldm/flux`, `comfy/ldm/chroma`): double blocks (separate image and text
streams meeting in joint attention) and single blocks (attention and MLP fused in linear1/linear2).
The text enters through `txt_in`; Flux.1 also reads the pooled CLIP-L vector through `vector_in`.
Three variants share it: Flux.1 (T5 + CLIP-L), Flux.2 (a Mistral encoder's stacked hidden states, a
shared modulation), Chroma (T5 alone, no `vector_in`, its modulation from `distilled_guidance_layer`).

Names in diffusers: Flux.1's and Chroma's transformers (`FluxTransformer2DModel`,
`ChromaTransformer2DModel`) split the fused attention (`qkv` -> to_q/to_k/to_v, single blocks'
`linear1` -> to_q/to_k/to_v/proj_mlp) and otherwise rename one to one; ComfyUI's LoraLoader reads
those names for every Flux-derived model (its `flux_to_diffusers` map), so Chroma's LoRAs use them.
Flux.2's transformer (`Flux2Transformer2DModel`) names its blocks differently (`ff.linear_in`,
`attn.to_qkv_mlp_proj`), which ComfyUI does not map; its LoRAs keep ComfyUI's own names
(``diffusion_model.double_blocks.0.img_attn.qkv``), which ComfyUI reads for every model and diffusers'
Flux.2 loader converts (splitting `qkv` itself)."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, fused, register

# The double blocks' attention under diffusers' names, as Flux.1 and Flux.2 (`Flux2Transformer2DModel`)
# both name it: the fused qkv split into to_q/k/v (image) and add_q/k/v_proj (text)
_DOUBLE_ATTENTION = (
    (r"double_blocks\.(\d+)\.img_attn\.qkv", fused("transformer_blocks.{0}.attn", "to_q", "to_k", "to_v")),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv",
     fused("transformer_blocks.{0}.attn", "add_q_proj", "add_k_proj", "add_v_proj")),
    (r"double_blocks\.(\d+)\.img_attn\.proj", "transformer_blocks.{0}.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", "transformer_blocks.{0}.attn.to_add_out"),
)

FLUX = register(DiTAdapter(
    kind="flux", label="Flux",
    signature=(r"txt_in", r"double_blocks\.\d+\.img_attn\.qkv"),
    image_models=("flux", "flux2", "chroma"),
    projections=(ProjectionRule("txt_in", "tokens", "context_embedder"),
                 ProjectionRule("vector_in.in_layer", "pooled", "time_text_embed.text_embedder.linear_1")),
    mlps=(MLPRule(r"double_blocks\.(\d+)\.img_mlp\.2", "transformer_blocks.{0}.ff.net.2"),
          MLPRule(r"single_blocks\.(\d+)\.linear2", "single_transformer_blocks.{0}.proj_out", fused=True)),
    attention=r"double_blocks\.\d+\.(?:img|txt)_attn\.(?:qkv|proj)",
    blocks=("double_blocks.", "single_blocks."),
    variants=(
        Variant("flux2", "Flux.2", "its Mistral text encoder (CLIPLoader, type flux2)",
                marks=(r"double_stream_modulation_img\.lin",), config=(("image_model", "flux2"),),
                diffusers_names=False, lora_names="diffusion_model",
                renames=((r"txt_in", "context_embedder"),
                         *_DOUBLE_ATTENTION,
                         (r"double_blocks\.(\d+)\.img_mlp\.0", "transformer_blocks.{0}.ff.linear_in"),
                         (r"double_blocks\.(\d+)\.img_mlp\.2", "transformer_blocks.{0}.ff.linear_out"),
                         (r"double_blocks\.(\d+)\.txt_mlp\.0", "transformer_blocks.{0}.ff_context.linear_in"),
                         (r"double_blocks\.(\d+)\.txt_mlp\.2", "transformer_blocks.{0}.ff_context.linear_out"),
                         (r"single_blocks\.(\d+)\.linear1", "single_transformer_blocks.{0}.attn.to_qkv_mlp_proj"),
                         (r"single_blocks\.(\d+)\.linear2", "single_transformer_blocks.{0}.attn.to_out"))),
        Variant("chroma", "Chroma", "t5xxl alone (CLIPLoader, type chroma)",
                marks=(r"distilled_guidance_layer.*",), config=(("image_model", "chroma"),),
                lora_names="transformer"),
        Variant("flux1", "Flux.1", "clip_l + t5xxl (DualCLIPLoader, type flux)", custom_name="custom"),
    ),
    pooled_y=True,
    renames=((r"double_blocks\.(\d+)\.img_mlp\.0", "transformer_blocks.{0}.ff.net.0.proj"),
             (r"double_blocks\.(\d+)\.txt_mlp\.0", "transformer_blocks.{0}.ff_context.net.0.proj"),
             (r"double_blocks\.(\d+)\.txt_mlp\.2", "transformer_blocks.{0}.ff_context.net.2"),
             *_DOUBLE_ATTENTION,
             (r"double_blocks\.(\d+)\.img_mod\.lin", "transformer_blocks.{0}.norm1.linear"),
             (r"double_blocks\.(\d+)\.txt_mod\.lin", "transformer_blocks.{0}.norm1_context.linear"),
             (r"single_blocks\.(\d+)\.linear1",
              fused("single_transformer_blocks.{0}", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp*")),
             (r"single_blocks\.(\d+)\.modulation\.lin", "single_transformer_blocks.{0}.norm.linear")),
))

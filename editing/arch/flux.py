"""Flux's layout (`comfy/ldm/flux`, `comfy/ldm/chroma`): double blocks (separate image and text
streams meeting in joint attention) and single blocks (attention and MLP fused in linear1/linear2).
The text enters through `txt_in`; Flux.1 also reads the pooled CLIP-L vector through `vector_in`.
Three variants share it: Flux.1 (T5 + CLIP-L), Flux.2 (a Mistral encoder's stacked hidden states, a
shared modulation), Chroma (T5 alone, no `vector_in`, its modulation from `distilled_guidance_layer`)."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

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
                diffusers_names=False),
        Variant("chroma", "Chroma", "t5xxl alone (CLIPLoader, type chroma)",
                marks=(r"distilled_guidance_layer.*",), config=(("image_model", "chroma"),),
                diffusers_names=False),
        Variant("flux1", "Flux.1", "clip_l + t5xxl (DualCLIPLoader, type flux)", custom_name="custom"),
    ),
    pooled_y=True,
    renames=((r"double_blocks\.(\d+)\.img_mlp\.0", "transformer_blocks.{0}.ff.net.0.proj"),
             (r"double_blocks\.(\d+)\.txt_mlp\.0", "transformer_blocks.{0}.ff_context.net.0.proj"),
             (r"double_blocks\.(\d+)\.txt_mlp\.2", "transformer_blocks.{0}.ff_context.net.2")),
))

"""Wan 2.1 / 2.2 text-to-video (`comfy/ldm/wan`): blocks `blocks.N` with self-attention, a true
cross-attention to the text (`cross_attn.q/k/v/o`) and an MLP `ffn.0 -> ffn.2`. umT5's states enter
through `text_embedding` (Linear, GELU, Linear); the closed form edits its first Linear. Latents are
5-D video latents (16 channels; 48 for Wan 2.2 5B).

ComfyUI reads no diffusers names for Wan (`WanTransformer3DModel`: `attn2.to_k`, `ffn.net.2`,
`condition_embedder.text_embedder.linear_1`), so its LoRAs keep ComfyUI's names
(``diffusion_model.blocks.0.cross_attn.k``), which diffusers' Wan loader converts when the file holds
at least one block's layer (it fails on a file of `text_embedding` alone, the closed form's: export
that one with diffusers' names, `unet_names="diffusers"`, for diffusers)."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

WAN = register(DiTAdapter(
    kind="wan", label="Wan",
    signature=(r"text_embedding\.0", r"blocks\.\d+\.cross_attn\.k", r"blocks\.\d+\.ffn\.2"),
    image_models=("wan2.1",),
    projections=(ProjectionRule("text_embedding.0", "tokens"),),
    mlps=(MLPRule(r"blocks\.(\d+)\.ffn\.2"),),
    attention=r"blocks\.\d+\.cross_attn\.(?:q|k|v|o)",
    blocks=("blocks.",),
    variants=(Variant("wan", "Wan 2.1 / 2.2", "umt5_xxl (CLIPLoader, type wan)", lora_names="diffusion_model"),),
    renames=(*((rf"blocks\.(\d+)\.{comfy}_attn\.{a}", f"blocks.{{0}}.{diffusers}.{b}")
               for comfy, diffusers in (("self", "attn1"), ("cross", "attn2"))
               for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
             (r"blocks\.(\d+)\.ffn\.0", "blocks.{0}.ffn.net.0.proj"),
             (r"blocks\.(\d+)\.ffn\.2", "blocks.{0}.ffn.net.2"),
             (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1")),
    native_latent=64,
))

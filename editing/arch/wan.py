"""Wan 2.1 / 2.2 text-to-video (`comfy/ldm/wan`): blocks `blocks.N` with self-attention, a true
cross-attention to the text (`cross_attn.q/k/v/o`) and an MLP `ffn.0 -> ffn.2`. umT5's states enter
through `text_embedding` (Linear, GELU, Linear); the closed form edits its first Linear. Latents are
5-D video latents (16 channels; 48 for Wan 2.2 5B). ComfyUI reads no diffusers names for Wan, so its
LoRAs keep these names."""
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
    variants=(Variant("wan", "Wan 2.1 / 2.2", "umt5_xxl (CLIPLoader, type wan)"),),
    native_latent=64,
))

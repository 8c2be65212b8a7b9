"""Lumina 2 and Z-Image (`comfy/ldm/lumina`, NextDiT): one single-stream stack `layers.N` where image
and text tokens share every attention (`attention.qkv/out`) and a SwiGLU feed-forward
(`feed_forward.w1/w3 -> w2`); before it, `noise_refiner` blocks see the image alone and
`context_refiner` blocks the text alone. The text enters through `cap_embedder` = RMSNorm then
Linear. Lumina 2 reads Gemma 2, Z-Image Qwen3."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

LUMINA = register(DiTAdapter(
    kind="lumina", label="Lumina 2 / Z-Image",
    signature=(r"cap_embedder\.1", r"layers\.\d+\.feed_forward\.w2", r"layers\.\d+\.attention\.qkv"),
    image_models=("lumina2",),
    projections=(ProjectionRule("cap_embedder.1", "tokens", norm="cap_embedder.0"),),
    # the image stream's MLPs: the refiner that sees only the image, then the joint stack
    mlps=(MLPRule(r"noise_refiner\.(\d+)\.feed_forward\.w2"), MLPRule(r"layers\.(\d+)\.feed_forward\.w2")),
    attention=r"layers\.\d+\.attention\.(?:qkv|out)",
    blocks=("layers.", "noise_refiner.", "context_refiner."),
    variants=(Variant("z-image", "Z-Image", "qwen_3_4b (CLIPLoader, type lumina2)",
                      marks=(r"cap_pad_token",), config=(("z_image_modulation", True),)),
              Variant("lumina2", "Lumina 2", "gemma_2_2b (CLIPLoader, type lumina2)")),
))

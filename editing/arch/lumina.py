"""Lumina 2 and Z-Image (`comfy/ldm/lumina`, NextDiT): one single-stream stack `layers.N` where image
and text tokens share every attention (`attention.qkv/out`) and a SwiGLU feed-forward
(`feed_forward.w1/w3 -> w2`); before it, `noise_refiner` blocks see the image alone and
`context_refiner` blocks the text alone. The text enters through `cap_embedder` = RMSNorm then
Linear. Lumina 2 reads Gemma 2, Z-Image Qwen3.

Names in diffusers: Z-Image's transformer (`ZImageTransformer2DModel`) keeps ComfyUI's names but
splits `attention.qkv` into `attention.to_q/to_k/to_v` and calls `attention.out` `attention.to_out.0`;
ComfyUI's LoraLoader reads those names under ``diffusion_model.`` for Lumina-2-type models (its
`z_image_to_diffusers` map) and diffusers' Z-Image loader takes that prefix, so Z-Image's LoRAs use
them. Lumina 2's (`Lumina2Transformer2DModel`: `attn.to_q`, `feed_forward.linear_1`, `norm1.linear`)
are not mapped by ComfyUI (whose Lumina map has Z-Image's names, with K and V as wide as Q), so its
LoRAs keep ComfyUI's names, which diffusers' Lumina 2 loader converts only for a LoRA on every Linear
of every block at Lumina 2's real widths."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, fused, register

_BLOCK = r"((?:layers|noise_refiner|context_refiner)\.\d+)"

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
                      marks=(r"cap_pad_token",), config=(("z_image_modulation", True),),
                      lora_names="diffusion_model+diffusers",
                      renames=((_BLOCK + r"\.attention\.qkv",
                                fused("{0}.attention", "to_q", "to_k*", "to_v*")),
                               (_BLOCK + r"\.attention\.out", "{0}.attention.to_out.0"),
                               (_BLOCK + r"(\.(?:feed_forward\.w[123]|adaLN_modulation\.0))", "{0}{1}"),
                               (r"cap_embedder\.1", "cap_embedder.1"))),
              Variant("lumina2", "Lumina 2", "gemma_2_2b (CLIPLoader, type lumina2)", lora_names="diffusion_model",
                      renames=((_BLOCK + r"\.attention\.qkv", fused("{0}.attn", "to_q", "to_k*", "to_v*")),
                               (_BLOCK + r"\.attention\.out", "{0}.attn.to_out.0"),
                               (_BLOCK + r"\.feed_forward\.w([123])", "{0}.feed_forward.linear_{1}"),
                               (_BLOCK + r"\.adaLN_modulation\.1", "{0}.norm1.linear"),
                               (r"cap_embedder\.1", "time_caption_embed.caption_embedder.1")))),
))

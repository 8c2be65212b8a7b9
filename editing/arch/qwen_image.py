"""Qwen-Image (`comfy/ldm/qwen_image`): MMDiT blocks `transformer_blocks.N` with an image and a text
stream (`img_mlp` / `txt_mlp`) meeting in one attention (`attn.to_q/k/v` for the image, `add_*_proj`
for the text). The text is Qwen2.5-VL's last hidden state, read as `txt_in(txt_norm(context))`: the
RMSNorm in front is part of the projection the closed form edits. Latents are 5-D (one frame).
Its diffusers names (`QwenImageTransformer2DModel`) are ComfyUI's own, so its LoRAs name modules
``transformer.<name>``, which ComfyUI's LoraLoader and diffusers' Qwen-Image loader both read."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

QWEN_IMAGE = register(DiTAdapter(
    kind="qwen_image", label="Qwen-Image",
    signature=(r"txt_in", r"txt_norm", r"transformer_blocks\.\d+\.img_mlp\.net\.2"),
    image_models=("qwen_image",),
    projections=(ProjectionRule("txt_in", "tokens", "txt_in", norm="txt_norm"),),
    mlps=(MLPRule(r"transformer_blocks\.(\d+)\.img_mlp\.net\.2", "transformer_blocks.{0}.img_mlp.net.2"),),
    attention=r"transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)",
    blocks=("transformer_blocks.",),
    variants=(Variant("qwen-image", "Qwen-Image", "qwen_2.5_vl_7b (CLIPLoader, type qwen_image)",
                      lora_names="transformer"),),
    renames=((r"(transformer_blocks\.\d+\..+)", "{0}"),),
))

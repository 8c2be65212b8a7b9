"""PixArt-α / Σ (`comfy/ldm/pixart`): DiT blocks `blocks.N` with self-attention, a cross-attention to
the text (`cross_attn.q_linear`, `kv_linear` = K ‖ V fused, `proj`) and an MLP `mlp.fc1 -> fc2`. T5's
states enter through `y_embedder.y_proj` (fc1, GELU, fc2); the closed form edits fc1.

Its LoRAs use the diffusers transformer's names (`PixArtTransformer2DModel`: `attn1.to_q/to_k/to_v`
for the fused `attn.qkv`, `attn2.to_k/to_v` for `kv_linear`) as ``transformer.<name>``, which ComfyUI's
LoraLoader maps (its `pixart_to_diffusers`). diffusers itself has no LoRA loader for PixArt (neither
the pipeline nor the transformer takes one); PEFT reads these names on the transformer."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, fused, register

PIXART = register(DiTAdapter(
    kind="pixart", label="PixArt",
    signature=(r"y_embedder\.y_proj\.fc1", r"blocks\.\d+\.cross_attn\.kv_linear", r"t_block\.1"),
    image_models=("pixart_alpha", "pixart_sigma"),
    projections=(ProjectionRule("y_embedder.y_proj.fc1", "tokens", "caption_projection.linear_1"),),
    mlps=(MLPRule(r"blocks\.(\d+)\.mlp\.fc2", "transformer_blocks.{0}.ff.net.2"),),
    attention=r"blocks\.\d+\.cross_attn\.(?:q_linear|kv_linear|proj)",
    blocks=("blocks.",),
    variants=(Variant("pixart", "PixArt-α / Σ", "t5xxl (CLIPLoader, type pixart)", lora_names="transformer"),),
    renames=((r"blocks\.(\d+)\.attn\.qkv",
              fused("transformer_blocks.{0}.attn1", "to_q", "to_k", "to_v")),
             (r"blocks\.(\d+)\.attn\.proj", "transformer_blocks.{0}.attn1.to_out.0"),
             (r"blocks\.(\d+)\.cross_attn\.q_linear", "transformer_blocks.{0}.attn2.to_q"),
             (r"blocks\.(\d+)\.cross_attn\.kv_linear", fused("transformer_blocks.{0}.attn2", "to_k", "to_v")),
             (r"blocks\.(\d+)\.cross_attn\.proj", "transformer_blocks.{0}.attn2.to_out.0"),
             (r"blocks\.(\d+)\.mlp\.fc1", "transformer_blocks.{0}.ff.net.0.proj")),
))

"""SD3 / SD3.5 (`comfy/ldm/modules/diffusionmodules/mmdit.py`): joint blocks with an image
(`x_block`) and a text (`context_block`) stream; the text enters through `context_embedder` (CLIP-L ‖
CLIP-G padded to 4096, then T5, along the tokens) and the pooled L ‖ G through `y_embedder`."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

SD3 = register(DiTAdapter(
    kind="sd3", label="SD3",
    signature=(r"context_embedder", r"joint_blocks\.\d+\.x_block\.attn\.qkv"),
    projections=(ProjectionRule("context_embedder", "tokens", "context_embedder"),
                 ProjectionRule("y_embedder.mlp.0", "pooled", "time_text_embed.text_embedder.linear_1")),
    mlps=(MLPRule(r"joint_blocks\.(\d+)\.x_block\.mlp\.fc2", "transformer_blocks.{0}.ff.net.2"),),
    attention=r"joint_blocks\.\d+\.(?:x_block|context_block)\.attn\.(?:qkv|proj)",
    blocks=("joint_blocks.",),
    variants=(Variant("sd3", "SD3", "clip_l + clip_g + t5xxl (TripleCLIPLoader)", custom_name="custom"),),
    renames=((r"joint_blocks\.(\d+)\.x_block\.mlp\.fc1", "transformer_blocks.{0}.ff.net.0.proj"),),
))

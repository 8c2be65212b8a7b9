"""AuraFlow (`comfy/ldm/aura`): MMDiT double layers (image `mlpX` and text `mlpC` streams, joint
attention `attn.w1*/w2*`) then single layers; Pile-T5's states enter through `cond_seq_linear`."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

AURAFLOW = register(DiTAdapter(
    kind="auraflow", label="AuraFlow",
    signature=(r"cond_seq_linear", r"double_layers\.\d+\.attn\.w1q"),
    projections=(ProjectionRule("cond_seq_linear", "tokens", "context_embedder"),),
    mlps=(MLPRule(r"double_layers\.(\d+)\.mlpX\.c_proj", "joint_transformer_blocks.{0}.ff.out_projection"),
          MLPRule(r"single_layers\.(\d+)\.mlp\.c_proj", "single_transformer_blocks.{0}.ff.out_projection")),
    attention=r"double_layers\.\d+\.attn\.w[12][qkvo]",
    blocks=("double_layers.", "single_layers."),
    variants=(Variant("auraflow", "AuraFlow", "pile_t5xl (the checkpoint's own CLIP)"),),
))

"""AuraFlow (`comfy/ldm/aura`): MMDiT double layers (image `mlpX` and text `mlpC` streams, joint
attention `attn.w1*/w2*`) then single layers; Pile-T5's states enter through `cond_seq_linear`.

Its LoRAs use the diffusers transformer's names (`AuraFlowTransformer2DModel`; the double layers' `w2*`
are the image stream's `to_q/to_k/to_v/to_out.0`, `w1*` the text's `add_*_proj/to_add_out`) as
``transformer.<name>``, which ComfyUI's LoraLoader (its `auraflow_to_diffusers`) and diffusers'
AuraFlow loader both read."""
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
    variants=(Variant("auraflow", "AuraFlow", "pile_t5xl (the checkpoint's own CLIP)", lora_names="transformer"),),
    renames=(*((rf"double_layers\.(\d+)\.attn\.{a}", f"joint_transformer_blocks.{{0}}.attn.{b}")
               for a, b in (("w2q", "to_q"), ("w2k", "to_k"), ("w2v", "to_v"), ("w2o", "to_out.0"),
                            ("w1q", "add_q_proj"), ("w1k", "add_k_proj"), ("w1v", "add_v_proj"),
                            ("w1o", "to_add_out"))),
             *((rf"single_layers\.(\d+)\.attn\.{a}", f"single_transformer_blocks.{{0}}.attn.{b}")
               for a, b in (("w1q", "to_q"), ("w1k", "to_k"), ("w1v", "to_v"), ("w1o", "to_out.0"))),
             *((rf"double_layers\.(\d+)\.{a}\.c_fc([12])", f"joint_transformer_blocks.{{0}}.{b}.linear_{{1}}")
               for a, b in (("mlpX", "ff"), ("mlpC", "ff_context"))),
             (r"double_layers\.(\d+)\.mlpC\.c_proj", "joint_transformer_blocks.{0}.ff_context.out_projection"),
             (r"double_layers\.(\d+)\.modX\.1", "joint_transformer_blocks.{0}.norm1.linear"),
             (r"double_layers\.(\d+)\.modC\.1", "joint_transformer_blocks.{0}.norm1_context.linear"),
             (r"single_layers\.(\d+)\.mlp\.c_fc([12])", "single_transformer_blocks.{0}.ff.linear_{1}"),
             (r"single_layers\.(\d+)\.modCX\.1", "single_transformer_blocks.{0}.norm1.linear")),
))

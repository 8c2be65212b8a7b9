"""HiDream-I1 (`comfy/ldm/hidream`): double-stream then single-stream blocks with mixture-of-experts
feed-forwards (a shared expert plus routed ones); every block has its own caption projection reading
one of Llama 3.1's hidden layers (and the last one T5's), and the pooled CLIP-L ‖ CLIP-G vector enters
through `p_embedder`. The closed form would need Llama's per-layer states, which the CLIP gives only
as a separate conditioning: it refuses HiDream and names the methods that work.

Its diffusers names (`HiDreamImageTransformer2DModel`) are ComfyUI's own, so its LoRAs name modules
``transformer.<name>``, which ComfyUI's LoraLoader and diffusers' HiDream loader both read."""
from __future__ import annotations

from .dit import DiTAdapter, MLPRule, ProjectionRule, Variant, register

HIDREAM = register(DiTAdapter(
    kind="hidream", label="HiDream",
    signature=(r"caption_projection\.\d+\.linear", r"double_stream_blocks\.\d+\.block\.attn1\.to_q"),
    image_models=("hidream",),
    projections=(ProjectionRule("p_embedder.pooled_embedder.linear_1", "pooled"),),
    # the shared experts see every image token; the routed ones only the tokens routed to them
    mlps=(MLPRule(r"double_stream_blocks\.(\d+)\.block\.ff_i\.shared_experts\.w2"),
          MLPRule(r"single_stream_blocks\.(\d+)\.block\.ff_i\.shared_experts\.w2")),
    attention=r"double_stream_blocks\.\d+\.block\.attn1\.(?:to_q|to_k|to_v|to_out|to_q_t|to_k_t|to_v_t|to_out_t)",
    blocks=("double_stream_blocks.", "single_stream_blocks."),
    variants=(Variant("hidream", "HiDream-I1", "clip_l + clip_g + t5xxl + llama_3.1_8b (QuadrupleCLIPLoader)",
                      lora_names="transformer"),),
    renames=((r"((?:double|single)_stream_blocks\.\d+\..+|p_embedder\.pooled_embedder\.linear_1)", "{0}"),),
    pooled_y=True,
    closed_form_note=("HiDream reads the prompt in every block from one of Llama 3.1's hidden layers, which "
                      "the closed form cannot reach through the CLIP's context: use Unlearn Concept (RGD) or "
                      "ConceptPrune on HiDream"),
))

"""The text-to-image and text-to-video families of ComfyUI 0.3.75 at tiny widths, random weights.

Each family is ComfyUI's own model config class (`comfy.supported_models`) around a small unet_config
(the keys `model_detection.py` reads off a checkpoint, at small widths and depths: module names are
the real ones), wrapped in a ModelPatcher on the CPU, and a real `comfy.sd.CLIP` made of the family's
own text-encoder classes (`comfy.text_encoders.*`) with small configs given the way ComfyUI takes
them (`model_options["<encoder name>_model_config"]`) and the family's real tokenizer.

    model, clip, info = build("qwen_image")

Build outside `torch.inference_mode()` when the weights will need gradients (tensors made inside it
are inference tensors). Tokenizers are read once per family and process, and shared by the CLIPs.

Only in ComfyUI copies that have these families (not the 2024-03 one). Three tokenizers are not
shipped with ComfyUI but read from the text encoder's checkpoint (`tokenizer_data`): Gemma 2's and
umT5's SentencePiece models and Mistral's Tekken vocabulary. Nothing may be downloaded here, so those
three get stand-ins built on the spot with the real special-token ids (see `_spiece_model`,
`_tekken_json`); their ordinary word pieces differ from the real vocabularies.
"""
from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import io
import json
import os
import tempfile

import torch

NAMES = ("flux2", "chroma", "qwen_image", "z_image", "lumina2", "hidream", "wan21", "wan22", "pixart_sigma",
         "hunyuan_image21", "auraflow")

# ---------------------------------------------------------------------------------------------------
# tiny text-encoder configs (keys of the dataclass / json config each ComfyUI encoder class reads)

# Llama-family encoders keep their vocabularies (the real tokenizers emit ids up to them) and ComfyUI's
# fixed head_dim (a class attribute, 128 or Gemma's 256); one head so the width can be small.
_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1)
QWEN25_VL = dict(_LLM, num_hidden_layers=4)  # Qwen-Image's, HunyuanImage's Qwen2.5-VL 7B (Hunyuan reads hidden -3)
QWEN3 = dict(_LLM, num_hidden_layers=3)      # Z-Image's Qwen3-4B (read at the penultimate layer)
GEMMA2 = dict(_LLM, num_hidden_layers=3)     # Lumina 2's Gemma 2 2B (penultimate layer)
LLAMA3 = dict(_LLM)                          # HiDream's Llama 3.1 8B (every layer)
MISTRAL3 = dict(_LLM, num_hidden_layers=4)   # Flux.2's Mistral Small 3 24B
MISTRAL3_LAYERS = [1, 2, 3]                  # its layers [10, 20, 30] of 40, scaled: stacked along the width
# T5 family: ComfyUI's json configs with these keys replaced
T5 = dict(d_model=64, d_ff=128, d_kv=16, num_heads=2, num_layers=2)
# byT5: HunyuanVideo's ByT5Mapper hard-codes byT5-small-glyph's 1472 width, so it stays wide with one
# narrow layer
BYT5 = dict(d_model=1472, d_ff=64, d_kv=16, num_heads=2, num_layers=1)
CLIP_L = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2, projection_dim=64)
# bigG is read at its penultimate layer: ComfyUI asserts the layer exists, so three layers
CLIP_G = dict(hidden_size=96, intermediate_size=384, num_attention_heads=4, num_hidden_layers=3, projection_dim=96)


def _spec(name: str) -> dict:
    """unet_config, encoder set-up and layout facts of one family (imports ComfyUI lazily)."""
    import comfy.supported_models_base

    Target = comfy.supported_models_base.ClipTarget
    t5w = T5["d_model"]
    llm = QWEN25_VL["hidden_size"]

    if name == "flux2":
        flux = _te("flux")
        width = MISTRAL3["hidden_size"] * len(MISTRAL3_LAYERS)
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptyFlux2LatentImage", video=False,
            unet=dict(image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=2, mlp_ratio=3.0, theta=2000,
                      out_channels=128, global_modulation=True, vec_in_dim=None, mlp_silu_act=True, qkv_bias=False,
                      ops_bias=False, default_ref_method="index", ref_index_scale=10.0, patch_size=1,
                      in_channels=128, hidden_size=256, context_in_dim=width, depth=1, depth_single_blocks=1,
                      guidance_embed=True),
            # supported_models.Flux2.clip_target() is a TODO (None) in 0.3.75: this is what
            # comfy.sd.load_text_encoder_state_dicts builds for a Mistral 3 checkpoint
            target=Target(flux.Flux2Tokenizer, flux.flux2_te()),
            model_options={"mistral3_24b_model_config": MISTRAL3,
                           "mistral3_24b_class": functools.partial(flux.Mistral3_24BModel, layer=MISTRAL3_LAYERS)},
            tokenizer_data=_tekken_tokenizer_data,
            context_width=width, pooled_width=0,
            text_inputs={"c_crossattn": ["txt_in.weight"]},
            notes="Mistral 3 hidden states of 3 layers stacked along the width (3 x 64); model_base.Flux2 "
                  "left-pads the context with zeros to 512 tokens; guidance (3.5 unless the "
                  "conditioning has one) feeds guidance_in; no biases anywhere (ops_bias False); the prompt "
                  "goes inside a system-prompt template whose tokens are not dropped; stand-in Tekken vocabulary "
                  "(real special ids: <s>=1, <pad>=11, [INST]=3, [SYSTEM_PROMPT]=17)")
    if name == "chroma":
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptySD3LatentImage", video=False,
            unet=dict(image_model="chroma", axes_dim=[16, 56, 56], num_heads=2, mlp_ratio=4.0, theta=10000,
                      out_channels=64, qkv_bias=True, patch_size=2, in_channels=64, hidden_size=256,
                      context_in_dim=t5w, depth=1, depth_single_blocks=1, in_dim=64, out_dim=256, hidden_dim=64,
                      n_layers=2),
            target=None, model_options={"t5xxl_model_config": T5}, tokenizer_data=dict,
            context_width=t5w, pooled_width=0,
            text_inputs={"c_crossattn": ["txt_in.weight", "txt_in.bias"]},
            notes="T5 only (PixArt's te): no pooled output; forward needs guidance (model_base.Chroma sends "
                  "0 unless the conditioning has one); distilled_guidance_layer out_dim = hidden_size; "
                  "in_channels 64 = 16 latent channels x 2x2 patch")
    if name == "qwen_image":
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptySD3LatentImage", video=False,
            unet=dict(image_model="qwen_image", in_channels=64, num_layers=2, num_attention_heads=2,
                      joint_attention_dim=llm),
            target=None,
            model_options={"qwen25_7b_model_config": QWEN25_VL,
                           "qwen25_7b_class": _small_vision(_te("qwen_image").Qwen25_7BVLIModel)},
            tokenizer_data=dict,
            context_width=llm, pooled_width=0,
            text_inputs={"c_crossattn": ["txt_norm.weight", "txt_in.weight", "txt_in.bias"]},
            notes="txt_in reads txt_norm(context) (RMSNorm); joint_attention_dim is not read off checkpoints "
                  "(always 3584 there); QwenImageTEModel drops the system template (the tokens up to the "
                  "second <|im_start|>user\\n) from the context; Wan 2.1 latent format (3-D): "
                  "common_ksampler unsqueezes the 4-D empty latent to [B,16,1,H,W] and the model's "
                  "process_img needs 5-D")
    if name == "z_image":
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptySD3LatentImage", video=False,
            unet=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=QWEN3["hidden_size"],
                      n_layers=2, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
                      axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                      z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
            target=None, model_options={"qwen3_4b_model_config": QWEN3}, tokenizer_data=dict,
            context_width=QWEN3["hidden_size"], pooled_width=0,
            text_inputs={"c_crossattn": ["cap_embedder.0.weight", "cap_embedder.1.weight", "cap_embedder.1.bias"]},
            notes="Lumina 2's NextDiT with z_image_modulation (adaLN reads min(dim, 256): dim >= 256); "
                  "cap_embedder = RMSNorm then Linear; forward needs num_tokens (model_base.Lumina2 sends it); "
                  "context padded with cap_pad_token to a multiple of 32 inside the model; the chat template "
                  "(<|im_start|>user ... <|im_start|>assistant) stays in the context; Qwen3 read at its "
                  "penultimate layer")
    if name == "lumina2":
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptySD3LatentImage", video=False,
            unet=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=192, cap_feat_dim=GEMMA2["hidden_size"],
                      n_layers=2, qk_norm=True, n_heads=2, n_kv_heads=1, axes_dims=[32, 32, 32],
                      axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0),
            target=None, model_options={"gemma2_2b_model_config": GEMMA2},
            tokenizer_data=lambda: {"spiece_model": _spiece_model("gemma2")},
            context_width=GEMMA2["hidden_size"], pooled_width=0,
            text_inputs={"c_crossattn": ["cap_embedder.0.weight", "cap_embedder.1.weight", "cap_embedder.1.bias"]},
            notes="cap_embedder = RMSNorm then Linear; forward needs num_tokens; Gemma 2 at its penultimate "
                  "layer, BOS kept; ComfyUI's template uses CLIPTextEncodeLumina2, which prepends a system "
                  "prompt and '<Prompt Start> ' to the text (plain CLIPTextEncode here); stand-in Gemma "
                  "SentencePiece (real ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3)")
    if name == "hidream":
        tw, lw = T5["d_model"], LLAMA3["hidden_size"]
        pooled = CLIP_L["projection_dim"] + CLIP_G["projection_dim"]
        unet = dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32],
                    caption_channels=[tw, lw], max_resolution=[128, 128], in_channels=16, llama_layers=[0, 1],
                    num_attention_heads=2, num_routed_experts=4, num_activated_experts=2, num_layers=1,
                    num_single_layers=1, out_channels=16, patch_size=2, text_emb_dim=pooled)
        n_llama = unet["num_layers"] + unet["num_single_layers"]
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptySD3LatentImage", video=False, unet=unet,
            # supported_models.HiDream.clip_target() is a TODO (None): QuadrupleCLIPLoader builds this
            target=Target(_te("hidream").HiDreamTokenizer, _te("hidream").hidream_clip()),
            model_options={"clip_l_model_config": CLIP_L, "clip_g_model_config": CLIP_G, "t5xxl_model_config": T5,
                           "llama_model_config": LLAMA3},
            tokenizer_data=dict,
            context_width=tw, pooled_width=pooled,
            text_inputs={"c_crossattn": [f"caption_projection.{n_llama}.linear.weight"],
                         "conditioning_llama3": [f"caption_projection.{i}.linear.weight" for i in range(n_llama)],
                         "pooled_output": ["p_embedder.pooled_embedder.linear_1.weight",
                                           "p_embedder.pooled_embedder.linear_1.bias"]},
            notes="four encoders: the context is T5's (128 tokens), the Llama 3.1 hidden states of every "
                  "layer go as conditioning_llama3 [B, layers, tokens, width] (the embeddings' state dropped); each "
                  "block reads the layer llama_layers names through its own caption_projection; pooled "
                  "= CLIP-L projected || CLIP-G projected; ComfyUI hard-codes only the widths of the zeros it "
                  "puts for a missing encoder (4096, 768 + 1280); under transformers 5 ComfyUI's Llama 3 "
                  "tokenizer drops the spaces ('a red circle' -> 'ared', 'circle')")
    if name in ("wan21", "wan22"):
        ch = 16 if name == "wan21" else 48
        return dict(
            config_class=_CONFIG_CLASS[name],
            latent_node="EmptyHunyuanLatentVideo" if name == "wan21" else "Wan22ImageToVideoLatent", video=True,
            unet=dict(image_model="wan2.1", dim=256, out_dim=ch, num_heads=2, ffn_dim=512, num_layers=2,
                      patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                      eps=1e-6, in_dim=ch, model_type="t2v", text_dim=t5w),
            target=None, model_options={"umt5xxl_model_config": T5},
            tokenizer_data=lambda: {"spiece_model": _spiece_model("umt5")},
            context_width=t5w, pooled_width=0,
            text_inputs={"c_crossattn": ["text_embedding.0.weight", "text_embedding.0.bias"]},
            notes="umT5, padded to 512 tokens with the padding zeroed (zero_out_masked); text_embedding "
                  "(Linear, GELU, Linear) feeds every blocks.N.cross_attn.{k,v}; text_dim is not read off "
                  "checkpoints (always 4096 there); 5-D latents [B,C,T,H,W]" +
                  ("" if name == "wan21" else "; Wan 2.2 5B: 48 channels at 1/16, model_base.WAN22 "
                   "(image_to_video, per-frame timesteps when a noise mask is given)") +
                  "; stand-in umT5 SentencePiece (real ids: <pad>=0 </s>=1 <unk>=2)")
    if name == "pixart_sigma":
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptyLatentImage", video=False,
            unet=dict(image_model="pixart_sigma", num_heads=2, patch_size=2, hidden_size=128, in_channels=4, depth=2,
                      model_max_length=300, micro_condition=False, caption_channels=t5w),
            target=None, model_options={"t5xxl_model_config": T5}, tokenizer_data=dict,
            context_width=t5w, pooled_width=0,
            text_inputs={"c_crossattn": ["y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias"]},
            notes="y_embedder.y_proj (Mlp fc1, fc2) reads T5 and feeds blocks.N.cross_attn (q_linear, fused "
                  "kv_linear); y_embedder.y_embedding (a buffer [300, T5 width]) is the caption used for "
                  "dropped prompts, unused in sampling; caption_channels is not read off checkpoints "
                  "(always 4096 there); the sin-cos position embedding needs (H + W) / 2 > 32 latent pixels "
                  "(else a division by zero): 512 px images; EPS prediction, learned sigma cut off; "
                  "negative = T5 pads only (no EOS)")
    if name == "hunyuan_image21":
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptyHunyuanImageLatent", video=False,
            unet=dict(image_model="hunyuan_video", in_channels=64, patch_size=[1, 1], out_channels=64, vec_in_dim=None,
                      axes_dim=[64, 64], meanflow=False, context_in_dim=llm, hidden_size=256, mlp_ratio=4.0,
                      num_heads=2, depth=1, depth_single_blocks=1, theta=256, qkv_bias=True, byt5=True,
                      guidance_embed=False, use_cond_type_embedding=False, vision_in_dim=None),
            # DualCLIPLoader (Qwen2.5-VL + byT5) with type hunyuan_image; ComfyUI gives the byT5 the te's
            # model_options without a model_name, so its config key is "_model_config"
            target=None,
            model_options={"qwen25_7b_model_config": QWEN25_VL, "_model_config": BYT5,
                           "qwen25_7b_class": _small_vision(_te("hunyuan_image").Qwen25_7BVLIModel)},
            tokenizer_data=dict,
            context_width=llm, pooled_width=0,
            text_inputs={"c_crossattn": ["txt_in.input_embedder.weight", "txt_in.input_embedder.bias",
                                         "txt_in.c_embedder.in_layer.weight", "txt_in.c_embedder.in_layer.bias"],
                         "conditioning_byt5small": ["byt5_in.layernorm.weight", "byt5_in.layernorm.bias",
                                                    "byt5_in.fc1.weight", "byt5_in.fc1.bias"]},
            notes="HunyuanVideo's class with 2-D patches and no vector_in; txt_in is a TokenRefiner: "
                  "input_embedder reads the tokens and c_embedder their mean; Qwen2.5-VL read 3 layers from "
                  "the end (hidden -3); the system template is dropped from the context; byT5 (1472 wide, "
                  "hard-coded by byt5_in) runs only on quoted text in the prompt and joins the text tokens "
                  "after byt5_in; guidance 6.0 is sent but unused without guidance_in")
    if name == "auraflow":
        return dict(
            config_class=_CONFIG_CLASS[name], latent_node="EmptyLatentImage", video=False,
            unet=dict(max_seq=256, cond_seq_dim=t5w, n_double_layers=1, n_layers=2, dim=128, n_heads=2,
                      global_conddim=128, in_channels=4, out_channels=4, patch_size=2),
            target=None, model_options={"pile_t5xl_model_config": T5}, tokenizer_data=dict,
            context_width=t5w, pooled_width=0,
            text_inputs={"c_crossattn": ["cond_seq_linear.weight"]},
            notes="Pile T5 (SentencePiece shipped in ComfyUI), padded to 256 tokens with the padding zeroed; "
                  "cond_seq_linear has no bias and 8 register_tokens are put before the text; dim, n_heads "
                  "and global_conddim are not read off checkpoints (3072, 12, 3072 there)")
    raise KeyError(f"unknown family {name!r}; known: {', '.join(NAMES)}")


def _te(module: str):
    return importlib.import_module("comfy.text_encoders." + module)


# what each family needs of a ComfyUI copy (and of the environment) besides its config class
_NEEDS = {"flux2": ("comfy.ldm.flux", "comfy.text_encoders.flux"),
          "chroma": ("comfy.ldm.chroma", "comfy.text_encoders.pixart_t5"),
          "qwen_image": ("comfy.ldm.qwen_image", "comfy.text_encoders.qwen_image", "comfy.text_encoders.qwen_vl"),
          "z_image": ("comfy.ldm.lumina", "comfy.text_encoders.z_image"),
          "lumina2": ("comfy.ldm.lumina", "comfy.text_encoders.lumina2", "sentencepiece"),
          "hidream": ("comfy.ldm.hidream", "comfy.text_encoders.hidream"),
          "wan21": ("comfy.ldm.wan", "comfy.text_encoders.wan", "sentencepiece"),
          "wan22": ("comfy.ldm.wan", "comfy.text_encoders.wan", "sentencepiece"),
          "pixart_sigma": ("comfy.ldm.pixart", "comfy.text_encoders.pixart_t5"),
          "hunyuan_image21": ("comfy.ldm.hunyuan_video", "comfy.text_encoders.hunyuan_image",
                              "comfy.text_encoders.qwen_vl"),
          "auraflow": ("comfy.ldm.aura", "comfy.text_encoders.aura_t5", "sentencepiece")}
_CONFIG_CLASS = {"flux2": "Flux2", "chroma": "Chroma", "qwen_image": "QwenImage", "z_image": "ZImage",
                 "lumina2": "Lumina2", "hidream": "HiDream", "wan21": "WAN21_T2V", "wan22": "WAN22_T2V",
                 "pixart_sigma": "PixArtSigma", "hunyuan_image21": "HunyuanImage21", "auraflow": "AuraFlow"}


def missing(name: str) -> str | None:
    """Why family `name` cannot be built with the imported ComfyUI and environment, or None."""
    import comfy.supported_models

    if not hasattr(comfy.supported_models, _CONFIG_CLASS[name]):
        return f"this ComfyUI has no supported_models.{_CONFIG_CLASS[name]}"
    for module in _NEEDS[name]:
        if importlib.util.find_spec(module) is None:
            extra = " (pip install sentencepiece: its tokenizer is SentencePiece)" if module == "sentencepiece" else ""
            return f"{name} needs {module}{extra}"
    return None


def build(name: str, seed: int = 0, clip: bool = True, unet: dict | None = None):
    """(ModelPatcher, CLIP or None, info) of family `name` with random weights (seeded). `unet`
    replaces entries of the tiny unet_config (other widths, e.g. to match another library's model)."""
    import comfy.model_patcher
    import comfy.supported_models

    spec = _spec(name)
    spec["unet"].update(unet or {})
    config = getattr(comfy.supported_models, spec["config_class"])(dict(spec["unet"]))
    base = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    # ComfyUI's classes leave weights uninitialised (its loader fills them). The diffusion model's
    # parameters and buffers only: model_sampling's sigmas are the schedule.
    with torch.no_grad():
        for t in base.diffusion_model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        # norms' scales at identity, as a trained model's are in order of magnitude (a 0.02 RMSNorm in
        # front of a text projection, Qwen-Image's txt_norm or Lumina's cap_embedder.0, would shrink
        # the text 50 times)
        for mod in base.diffusion_model.modules():
            if "Norm" in type(mod).__name__:
                for p in mod.parameters(recurse=False):
                    if p.ndim == 1 and p.is_floating_point():
                        p.fill_(0.0 if p is getattr(mod, "bias", None) else 1.0)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)

    sd = base.diffusion_model.state_dict()
    keys = [k for group in spec["text_inputs"].values() for k in group]
    absent = [k for k in keys if k not in sd]
    assert not absent, f"{name}: text-input keys not in the model: {absent}"
    sequence_keys = [k for cond, group in spec["text_inputs"].items() if cond != "pooled_output" for k in group]

    info = {
        "image_model": spec["unet"].get("image_model"),  # None for AuraFlow (ComfyUI matches it by cond_seq_dim)
        "config_class": spec["config_class"],
        "latent_channels": config.latent_format.latent_channels,
        # 3: ComfyUI samples 5-D [B, C, T, H, W] (common_ksampler unsqueezes a 4-D empty latent)
        "latent_dimensions": config.latent_format.latent_dimensions,
        "video": spec["video"],
        "context_width": spec["context_width"],
        "pooled_width": spec["pooled_width"],
        # keys of model.model.diffusion_model's state dict: the modules reading the CLIP's token outputs
        # (context and, for HiDream / HunyuanImage, the extra streams), norms in front included
        "text_input_keys": sequence_keys,
        # the same keys by the conditioning entry each reads ("c_crossattn" = the CLIP's context;
        # "pooled_output" readers are only here)
        "text_inputs": {k: list(v) for k, v in spec["text_inputs"].items()},
        "latent_node": spec["latent_node"],
        "unet_config": dict(spec["unet"]),
        "notes": spec["notes"],
    }
    return model, (_clip(name, spec, seed + 1) if clip else None), info


_BUILT: dict = {}


def built(name: str):
    """`build(name)` once per process (seed 0, with its CLIP), shared by the test modules that only read
    the models; skips the calling test where this ComfyUI or environment lacks the family."""
    import pytest

    why = missing(name)
    if why:
        pytest.skip(why)
    if name not in _BUILT:
        _BUILT[name] = build(name)
    return _BUILT[name]


# ---------------------------------------------------------------------------------------------------
# CLIP


def _clip(name: str, spec: dict, seed: int):
    """A real comfy.sd.CLIP of the family's target with the tiny configs as model_options, random
    weights (norms at identity, so that hidden states keep a unit scale through the layers)."""
    import comfy.sd
    import comfy.supported_models

    target = spec["target"]
    if target is None:
        target = getattr(comfy.supported_models, spec["config_class"])(dict(spec["unet"])).clip_target()
    # A tokenizer holds no per-CLIP state and Qwen's and Llama's take ~1 s to read: one per family.
    tokenizer_data = spec["tokenizer_data"]()
    cached = _tokenizer(name, target.tokenizer, tokenizer_data)
    target = type(target)(lambda embedding_directory=None, tokenizer_data={}: cached, target.clip)

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # built under no_grad: ComfyUI writes projections in place
        c = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=dict(spec["model_options"]))
        model = c.cond_stage_model
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(0.0 if getattr(m, "add", False) else 1.0)  # Gemma's RMSNorm scales by 1 + w
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return c


_TOKENIZERS: dict = {}


def _tokenizer(name, cls, tokenizer_data):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = cls(embedding_directory=None, tokenizer_data=tokenizer_data)
    return _TOKENIZERS[name]


def _small_vision(clip_model):
    """`clip_model` (ComfyUI's Qwen2.5-VL SDClipModel) building `Qwen25_7BVLI` with a tiny vision
    tower: ComfyUI's class builds 32 blocks of 1280 (~670M parameters) that a text prompt never runs."""
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_vl as qwen_vl

    from conceptedit.tiny.qwen_image import classes as tiny_qwen_classes

    class Qwen25VL(tiny_qwen_classes()["TinyQwen25VL"]):  # the text tower as the tiny Qwen-Image builds it
        def __init__(self, config_dict, dtype, device, operations):
            super().__init__(config_dict, dtype, device, operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(
                hidden_size=32, output_hidden_size=llama.Qwen25_7BVLI_Config(**config_dict).hidden_size,
                intermediate_size=64, num_heads=2, num_layers=1, device=device, dtype=dtype, ops=operations)

    class SwapModelClass(comfy.sd1_clip.SDClipModel):
        # sits between clip_model and SDClipModel in the MRO: clip_model's own __init__ runs unchanged
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "model_class": Qwen25VL})

    return type(clip_model.__name__, (clip_model, SwapModelClass), {})


# ---------------------------------------------------------------------------------------------------
# stand-in tokenizer data (real special-token ids, small vocabularies)

_CORPUS = ["a red circle", "a blue square on a white table", "a photo of a cat sitting on a chair",
           "The quick brown fox jumps over the lazy dog.", "an oil painting of a mountain lake at dawn",
           "You are an assistant designed to generate superior images with the superior degree of "
           "image-text alignment based on textual prompts or user prompts."]


@functools.lru_cache(maxsize=None)
def _spiece_bytes(kind: str) -> bytes:
    import sentencepiece

    ids = {"gemma2": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3),
           "umt5": dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)}[kind]
    out = io.BytesIO()
    # byte fallback: any text tokenizes (the 256 byte pieces follow the special ids)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS * 4), model_writer=out, vocab_size=400,
                                             model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                             character_coverage=1.0, num_threads=1, minloglevel=2, **ids)
    return out.getvalue()


def _spiece_model(kind: str) -> torch.Tensor:
    """A SentencePiece model as a checkpoint carries it (uint8 tensor "spiece_model")."""
    return torch.frombuffer(bytearray(_spiece_bytes(kind)), dtype=torch.uint8)


# Mistral's Tekken special tokens at their real ranks (1000 in all, the rest <SPECIAL_n>)
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                     "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                     "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                     "[TOOL_CONTENT]"]
_TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                   r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=None)
def _tekken_json() -> bytes:
    """A tekken.json in Mistral's format: the 256 bytes and a few merges as the vocabulary."""
    specials = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(_MISTRAL_SPECIALS)]
    specials += [{"rank": i, "token_str": f"<SPECIAL_{i}>", "is_control": True}
                 for i in range(len(_MISTRAL_SPECIALS), 1000)]
    pieces = [bytes([i]) for i in range(256)]
    # byte-level BPE merges for " red" and " circle" (each merge's halves come before it)
    pieces += [b" r", b"ed", b" red", b" c", b"ir", b" cir", b"cl", b"le", b"cle", b" circ", b" circle"]
    vocab = [{"rank": r, "token_bytes": base64.b64encode(p).decode(), "token_str": None} for r, p in enumerate(pieces)]
    return json.dumps({"config": {"pattern": _TEKKEN_PATTERN, "num_vocab_tokens": len(vocab),
                                  "default_vocab_size": 131072, "default_num_special_tokens": 1000, "version": "v7"},
                       "vocab": vocab, "special_tokens": specials}).encode()


def _tekken_tokenizer_data() -> dict:
    import comfy.text_encoders.flux as flux

    data = {"tekken_model": torch.frombuffer(bytearray(_tekken_json()), dtype=torch.uint8)}
    try:
        flux.load_mistral_tokenizer(data["tekken_model"])
    except TypeError:
        data["mistral3_24b_tokenizer_class"] = _mistral3_tokenizer_tf5()
    return data


def _mistral3_tokenizer_tf5():
    """ComfyUI 0.3.75 converts Tekken with transformers 4's `MistralConverter(vocab=...)`; transformers 5
    reads a tekken.json file instead and its LlamaTokenizerFast adds no BOS unless asked. The same
    SDTokenizer settings as `flux.Mistral3Tokenizer`, with the converter called the new way."""
    import comfy.sd1_clip
    import comfy.text_encoders.flux as flux
    from transformers.integrations.mistral import MistralConverter

    class Mistral3Tokenizer(flux.Mistral3Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.tekken_data = tokenizer_data.get("tekken_model", None)
            raw = self.tekken_data.numpy().tobytes() if torch.is_tensor(self.tekken_data) else self.tekken_data
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "tekken.json")
                with open(path, "wb") as f:
                    f.write(raw)
                converted = MistralConverter(vocab_file=path).converted()
            args = {"tokenizer_object": converted, "legacy": False, "add_bos_token": True, "bos_token": "<s>",
                    "eos_token": "</s>", "unk_token": "<unk>"}
            comfy.sd1_clip.SDTokenizer.__init__(
                self, "", pad_with_end=False, embedding_size=5120, embedding_key="mistral3_24b",
                tokenizer_class=flux.MistralTokenizerClass, has_end_token=False, pad_to_max_length=False, pad_token=11,
                max_length=99999999, min_length=1, pad_left=True, tokenizer_args=args, tokenizer_data=tokenizer_data)

    return Mistral3Tokenizer

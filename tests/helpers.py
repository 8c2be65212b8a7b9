"""Small real ComfyUI models for tests that need the structure but not trained weights."""
from __future__ import annotations

import torch


def random_model(family: str = "tiny", seed: int = 0, device: str = "cpu", model_type=None):
    """A real ComfyUI ModelPatcher around a real UNetModel of the family's layout, random weights.
    Only sensible for the tiny layout on the CPU. `model_type`: a `comfy.model_base.ModelType`
    (default EPS; V_PREDICTION for a v-prediction model)."""
    import comfy.model_base
    from conceptedit.editing.arch import get_family

    cfg = _config(get_family(family).unet_config)
    model = comfy.model_base.BaseModel(cfg, model_type=model_type or comfy.model_base.ModelType.EPS, device=device)
    return _randomised_patcher(model, seed, device)


def sdxl_style_model(pooled_width: int = 64, seed: int = 0, model_type=None):
    """ComfyUI's own `model_base.SDXL` (its encode_adm: pooled ‖ 6 size embeddings of 256) around a
    UNet of the tiny layout that takes that vector as `y` (adm_in_channels), random weights: a model
    that, like SDXL, fails without y."""
    import comfy.model_base
    from conceptedit.editing.arch import TINY_UNET

    unet = dict(TINY_UNET, adm_in_channels=pooled_width + 6 * 256, num_classes="sequential")
    model = comfy.model_base.SDXL(_config(unet), model_type=model_type or comfy.model_base.ModelType.EPS, device="cpu")
    return _randomised_patcher(model, seed, "cpu")


def _config(unet):
    import comfy.supported_models_base

    class Config(comfy.supported_models_base.BASE):
        unet_config = dict(unet)
        unet_extra_config = {}

    return Config(dict(unet))


def _randomised_patcher(model, seed: int, device: str):
    import comfy.model_patcher
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    dev = torch.device(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)


def random_clip(seed: int = 1):
    """A real ComfyUI CLIP with the tiny text encoder's config (width 64, the real CLIP tokenizer)
    and random weights."""
    import functools
    import os

    import comfy.sd1_clip

    target = type("Target", (), {})()
    target.params = {}
    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny", "clip_config.json")
    target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel,
                                    clip_model=functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=cfg))
    target.tokenizer = comfy.sd1_clip.SD1Tokenizer
    return clip_from_target(target, seed)


def clip_from_target(target, seed: int):
    """A real ComfyUI CLIP of `target` (its `clip`, `tokenizer`, `params`) with random weights
    (layer norms at identity). Built under no_grad: ComfyUI writes its projection in place."""
    import comfy.sd

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = comfy.sd.CLIP(target)
        for name, p in c.cond_stage_model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return c


# SD3's text stack at small widths (ComfyUI hard-codes the 4096-wide joint context, so its T5 keeps
# T5-XXL's width with one narrow layer; the CLIPs are the tiny CLIP's config and a wider "bigG")
SD3_CLIP_G = {"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 96, "intermediate_size": 384,
              "layer_norm_eps": 1e-5, "max_position_embeddings": 77, "model_type": "clip_text_model",
              "num_attention_heads": 4, "num_hidden_layers": 4, "projection_dim": 96, "torch_dtype": "float32",
              "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
SD3_T5 = {"d_ff": 128, "d_kv": 8, "d_model": 4096, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
          "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 2, "num_layers": 2, "vocab_size": 32128,
          "relative_attention_num_buckets": 32, "eos_token_id": 1, "pad_token_id": 0}
SD3_POOLED = 64 + 96  # CLIP-L's pooled ‖ CLIP-G's: the SD3 model's adm_in_channels
SD3_POOLED_NO_L = 768 + 96  # without CLIP-L, ComfyUI puts 768 zeros (real CLIP-L's width) before G's


def sd3_clip(seed: int = 1, t5: bool = True, t5_attention_mask: bool = False, clip_l: bool = True):
    """A real ComfyUI CLIP of SD3's class (`SD3ClipModel`: its encode, CLIP-L ‖ G padded to 4096 then
    T5 along the tokens, pooled L ‖ G) with SD3's encoder settings (CLIP-L's penultimate layer,
    unprojected pooled; bigG's penultimate, projected) at small widths, SD3's real tokenizers, and
    random weights; `t5_attention_mask` as SD3's loader option; without `clip_l` as DualCLIPLoader
    builds it from CLIP-G and T5."""
    import json
    import os

    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip as sd3
    import comfy.text_encoders.t5

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "tiny", "clip_config.json")) as f:
        clip_l_cfg = json.load(f)

    class SmallSD3Clip(sd3.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            torch.nn.Module.__init__(self)
            sd = comfy.sd1_clip.SDClipModel
            self.clip_l = sd(device=device, dtype=dtype, layer="hidden", layer_idx=-2, textmodel_json_config=clip_l_cfg,
                             layer_norm_hidden_state=False, return_projected_pooled=False,
                             model_options=model_options) if clip_l else None
            self.clip_g = sd(device=device, dtype=dtype, layer="hidden", layer_idx=-2, textmodel_json_config=SD3_CLIP_G,
                             special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                             return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.t5xxl = sd(device=device, dtype=dtype, layer="last", layer_idx=None, textmodel_json_config=SD3_T5,
                            special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                            enable_attention_masks=t5_attention_mask, return_attention_masks=t5_attention_mask,
                            model_options={**model_options, "model_name": "t5xxl"}) if t5 else None
            self.t5_attention_mask = t5_attention_mask
            self.dtypes = {dtype}

    target = type("Target", (), {})()
    target.params = {}
    target.clip = SmallSD3Clip
    target.tokenizer = sd3.SD3Tokenizer
    return clip_from_target(target, seed)


def sd3_model(seed: int = 0, hidden_blocks: int = 2, pooled: int = SD3_POOLED):
    """ComfyUI's own SD3 model class (`supported_models.SD3` → `model_base.SD3`: rectified flow, shift
    3, y = the pooled text) at small widths, reading `sd3_clip`'s 4096-wide context and its pooled
    vector (`pooled` wide), random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": hidden_blocks,
           "adm_in_channels": pooled,
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": 4096, "out_features": 64 * hidden_blocks}},
           "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None}
    base = sm.SD3(dict(cfg)).get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ComfyUI's classes leave weights uninitialised (its loader fills them)
        for t in base.state_dict().values():  # parameters and buffers (pos_embed)
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())

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

"""Small real ComfyUI models for tests that need the structure but not trained weights."""
from __future__ import annotations

import torch


def random_model(family: str = "tiny", seed: int = 0, device: str = "cpu"):
    """A real ComfyUI ModelPatcher around a real UNetModel of the family's layout, random weights.
    Only sensible for the tiny layout on the CPU."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base
    from conceptedit.editing.arch import get_family

    fam = get_family(family)

    class Config(comfy.supported_models_base.BASE):
        unet_config = dict(fam.unet_config)
        unet_extra_config = {}

    cfg = Config(dict(fam.unet_config))
    model = comfy.model_base.BaseModel(cfg, device=device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device(device))


def random_clip(seed: int = 1):
    """A real ComfyUI CLIP with the tiny text encoder's config (width 64, the real CLIP tokenizer)
    and random weights."""
    import functools
    import os

    import comfy.sd
    import comfy.sd1_clip

    target = type("Target", (), {})()
    target.params = {}
    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny", "clip_config.json")
    target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel,
                                    clip_model=functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=cfg))
    target.tokenizer = comfy.sd1_clip.SD1Tokenizer
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = comfy.sd.CLIP(target)
        for name, p in c.cond_stage_model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return c

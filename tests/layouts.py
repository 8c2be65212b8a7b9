"""A matrix of model layouts built with ComfyUI's own classes at small widths (random weights):
what users load besides the four tables: SD1-like, SD2-like with v-prediction, SDXL-like (vector
conditioning y, two text encoders), refiner-like (clip_g alone, aesthetic-score y), a student with
blocks removed, a 9-channel inpainting UNet and a custom layout with its own text width."""
from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass, field

import torch

from helpers import clip_from_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BASE = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
             legacy=False, use_temporal_attention=False, use_temporal_resblock=False, adm_in_channels=None,
             model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
             transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1], use_linear_in_transformer=True,
             context_dim=64, num_head_channels=16)


@dataclass(frozen=True)
class Spec:
    name: str
    unet: dict
    clip: tuple[tuple[str, int], ...]   # (encoder name, width) in ComfyUI's order
    base: str = "base"                  # ComfyUI model class: base | sdxl | refiner
    v_prediction: bool = False
    blocks: int = 0                      # cross-attention transformer blocks the UNet has
    notes: dict = field(default_factory=dict)


def _u(**over):
    d = dict(_BASE)
    d.update(over)
    return d


SPECS = {
    "sd1_like": Spec("sd1_like", _u(use_linear_in_transformer=False, num_heads=4, num_head_channels=-1),
                     (("l", 64),), blocks=7),
    "sd2_v": Spec("sd2_v", _u(), (("h", 64),), v_prediction=True, blocks=7),
    "sdxl_like": Spec("sdxl_like", _u(channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 2],
                                      transformer_depth_middle=2, transformer_depth_output=[0, 0, 2, 2, 2, 2],
                                      context_dim=144, adm_in_channels=80 + 6 * 256, num_classes="sequential"),
                      (("l", 64), ("g", 80)), base="sdxl", blocks=14),
    "refiner_like": Spec("refiner_like", _u(model_channels=64, transformer_depth=[0, 2], transformer_depth_middle=-1,
                                            transformer_depth_output=[0, 0, 2, 2], context_dim=80,
                                            adm_in_channels=80 + 5 * 256, num_classes="sequential"),
                         (("g", 80),), base="refiner", blocks=6),
    "student": Spec("student", _u(transformer_depth_middle=-1, transformer_depth_output=[1, 0, 0, 1]), (("l", 64),),
                    blocks=4),
    "inpaint": Spec("inpaint", _u(in_channels=9), (("l", 64),), blocks=7),
    "custom": Spec("custom", _u(model_channels=32, channel_mult=[1, 3], num_res_blocks=[2, 1],
                                transformer_depth=[1, 0, 1], transformer_depth_output=[1, 0, 1, 1, 0],
                                context_dim=48, num_head_channels=8), (("l", 48),), blocks=6),
}


def _clip_json(width: int, projection: int) -> str:
    with open(os.path.join(ROOT, "tiny", "clip_config.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=width, intermediate_size=4 * width, projection_dim=projection, num_attention_heads=4)
    path = os.path.join(tempfile.mkdtemp(prefix="conceptedit-clip-"), f"clip_{width}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _encoder(name: str, width: int, device="cpu", dtype=None):
    import comfy.sd1_clip
    kw = dict(device=device, dtype=dtype, textmodel_json_config=_clip_json(width, width))
    if name == "g":  # bigG's conventions: penultimate hidden state, pad 0, no final layer norm
        kw.update(layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                  special_tokens={"start": 49406, "end": 49407, "pad": 0})
    return comfy.sd1_clip.SDClipModel(**kw)


def _clip(spec: Spec, seed: int):
    import comfy.sd1_clip
    import comfy.sdxl_clip

    target = type("Target", (), {})()
    target.params = {}
    if len(spec.clip) == 2:
        (_, wl), (_, wg) = spec.clip

        class SmallSDXLClip(comfy.sdxl_clip.SDXLClipModel):
            """ComfyUI's SDXL text model (its encode: clip_l ‖ clip_g hidden states, clip_g pooled)
            with both encoders at small widths."""

            def __init__(self, device="cpu", dtype=None, **kwargs):
                torch.nn.Module.__init__(self)
                self.clip_l = _encoder("l", wl, device, dtype)
                self.clip_g = _encoder("g", wg, device, dtype)
                self.dtypes = {dtype}

        target.clip = SmallSDXLClip
        target.tokenizer = comfy.sdxl_clip.SDXLTokenizer
    else:
        name, width = spec.clip[0]
        target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_name=name,
                                        clip_model=functools.partial(_small_encoder, name, width))
        tok = comfy.sdxl_clip.SDXLClipGTokenizer if name == "g" else comfy.sd1_clip.SDTokenizer
        target.tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer, clip_name=name, tokenizer=tok)
    return clip_from_target(target, seed)


def _small_encoder(name, width, device="cpu", dtype=None, **kwargs):
    return _encoder(name, width, device, dtype)


def build(name: str, seed: int = 0):
    """(MODEL, CLIP, Spec): real ComfyUI ModelPatcher and CLIP of layout `name`, random weights."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base

    spec = SPECS[name]

    class Config(comfy.supported_models_base.BASE):
        unet_config = dict(spec.unet)
        unet_extra_config = {}
        sampling_settings = {}

    cfg = Config(dict(spec.unet))
    mtype = comfy.model_base.ModelType.V_PREDICTION if spec.v_prediction else comfy.model_base.ModelType.EPS
    cls = {"base": comfy.model_base.BaseModel, "sdxl": comfy.model_base.SDXL,
           "refiner": comfy.model_base.SDXLRefiner}[spec.base]
    model = cls(cfg, model_type=mtype, device="cpu")
    if spec.unet["in_channels"] > 4:
        model.set_inpaint()  # what ComfyUI's model config does for a 9-channel UNet
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return patcher, _clip(spec, seed + 1), spec

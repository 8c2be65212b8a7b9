"""The tiny text-to-image model, built from ComfyUI's own modules.

- UNet: ComfyUI's `openaimodel.UNetModel` with `editing.arch.TINY_UNET` (SpatialTransformer blocks
  with attn2 and a GEGLU FFN under the SD key names, context width = the text width).
- Text encoder: ComfyUI's `clip_model.CLIPTextModel` (config `clip_config.json`: width 64, 4 layers,
  the real 49408-token vocabulary so the real CLIP tokenizer works), as `SD1ClipModel(clip_name="l")`.
- Latents are pixels: 4 x 32 x 32 = RGB in [-1, 1] plus a 4th channel trained to be 0, so a
  256x256 EmptyLatentImage has the right shape. Noise schedule and prediction are SD1.5's (EPS,
  scaled-linear 0.00085..0.012, 1000 steps), so ComfyUI's samplers work unchanged.

Weights are stored like an SD1 checkpoint: ``model.diffusion_model.*`` and
``cond_stage_model.transformer.*`` (fp16 safetensors).
"""
from __future__ import annotations

import logging
import os

import torch

try:  # inside the ComfyUI pack
    from ..editing.arch import TINY_CLIP, TINY_UNET, get_family  # noqa: F401
except ImportError:  # repository root on sys.path
    from editing.arch import TINY_CLIP, TINY_UNET, get_family  # noqa: F401

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP_CONFIG_PATH = os.path.join(HERE, "clip_config.json")
DEFAULT_WEIGHTS = os.path.join(HERE, "weights", "tiny_sd.safetensors")
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
LATENT_CHANNELS = 4
IMAGE_SIZE = 32
# SD1.5's noise schedule (what ComfyUI's ModelSamplingDiscrete uses by default).
LINEAR_START, LINEAR_END, TIMESTEPS = 0.00085, 0.012, 1000


def ensure_comfy() -> None:
    """Import ComfyUI headless (`comfy_host.locate`: $COMFYUI_PATH or the project's ComfyUI 0.3.75)."""
    try:
        from ..comfy_host.locate import ensure_comfy as _ensure
    except ImportError:  # tiny/ run as a top-level package (its training scripts)
        from comfy_host.locate import ensure_comfy as _ensure
    _ensure()


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def unet_config() -> dict:
    """TINY_UNET as ComfyUI's UNetModel takes it."""
    cfg = dict(TINY_UNET)
    cfg.pop("attention_resolutions", None)  # older table format; the per-block depths say it all
    return cfg


def build_unet(dtype: torch.dtype = torch.float32, device=None):
    """A fresh (uninitialised) ComfyUI UNetModel with the tiny config."""
    ensure_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(**unet_config(), dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)


def clip_classes():
    """(TinyClipModel, TinyClip): SDClipModel / SD1ClipModel subclasses with the tiny config.

    Constructor arguments go through by keyword (**kwargs) so that newer ComfyUI arguments
    (model_options=..., etc.) pass unchanged."""
    ensure_comfy()
    import comfy.sd1_clip

    class TinyClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, **kwargs):
            kwargs.setdefault("textmodel_json_config", CLIP_CONFIG_PATH)
            super().__init__(device=device, dtype=dtype, **kwargs)

    class TinyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, **kwargs):
            kwargs.setdefault("clip_name", "l")
            kwargs.setdefault("clip_model", TinyClipModel)
            with torch.no_grad():  # CLIPTextModel copies into a parameter in its constructor
                super().__init__(device=device, dtype=dtype, **kwargs)

    return TinyClipModel, TinyClip


def init_weights(module: torch.nn.Module, std: float = 0.02) -> None:
    """Initialise a ComfyUI module (its `disable_weight_init` layers start uninitialised):
    PyTorch's defaults for convs/linears/norms, small normals for embeddings, and zeros for the
    layers that end a residual branch (stable start for fast training)."""
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.Linear.reset_parameters(m) if isinstance(m, torch.nn.Linear) \
                else torch.nn.Conv2d.reset_parameters(m)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=std)
    for name, m in module.named_modules():
        last = name.split(".")[-1]
        zero = (name.endswith("out_layers.3") or last == "proj_out" or name == "out.2"
                or name.endswith("attn2.to_out.0") or name.endswith("ff.net.2"))
        if zero and hasattr(m, "weight"):
            torch.nn.init.zeros_(m.weight)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)


def trainable(module: torch.nn.Module) -> torch.nn.Module:
    """Make a ComfyUI module trainable: ComfyUI adds residuals in place (``x += attn(norm(x))``),
    which autograd rejects because the norm saved `x`; give each pre-norm a private copy."""
    try:
        from ..editing.hooks import copy_norm_inputs
    except ImportError:  # run as the script `python -m tiny.train`, where tiny is top-level
        from editing.hooks import copy_norm_inputs
    copy_norm_inputs(module)  # kept for the module's life: it is a training copy
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train()


def text_transformer(clip_model) -> torch.nn.Module:
    """The CLIPTextModel inside an SD1ClipModel-like wrapper."""
    return getattr(clip_model, "clip_l").transformer


def encode_ids(transformer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state [B, 77, width] (after the final layer norm), as SDClipModel's "last"."""
    return transformer(ids)[0]


def unet_state_to_checkpoint(sd: dict) -> dict:
    return {UNET_PREFIX + k: v for k, v in sd.items()}


def split_checkpoint(sd: dict) -> tuple[dict, dict]:
    unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    clip = {k[len(CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)}
    return unet, clip


def _weights_path(path: str | None, default: str = DEFAULT_WEIGHTS, trainer: str = "tiny.train") -> str:
    path = path or default
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiny model weights not found at {path}; train them with "
                                f"`bash run.sh py -m {trainer} --recipe shipped`")
    return path


def read_metadata(path: str | None = None) -> dict:
    """A tiny checkpoint's metadata (train config, world, ...), without reading its tensors."""
    from safetensors import safe_open
    with safe_open(_weights_path(path), framework="pt") as f:
        return f.metadata() or {}


def read_weights(path: str | None = None) -> tuple[dict, dict, dict]:
    """(unet_state, clip_state, metadata) from a tiny checkpoint file, as float32."""
    from safetensors import safe_open
    path = _weights_path(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    unet, clip = split_checkpoint(sd)
    return unet, clip, meta

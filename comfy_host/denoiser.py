"""`editing.hosts.Denoiser` and `Trainable` over a ComfyUI MODEL (`ComfyDenoiser`)."""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch

from ..editing.arch import Family, clip_hint
from ..editing.diffusion import sampling_cfg
from ..editing.errors import ConceptEditError, InvalidInputError
from ..editing.hosts import RunContext
from .patches import model_family, model_fingerprint, original_weights
from .text import ComfyText

log = logging.getLogger(__name__)
# the guidance a guidance-distilled Flux (Flux-dev) is run at: ComfyUI's default, as its FluxGuidance node
FLUX_GUIDANCE = 3.5


# ---- denoiser ------------------------------------------------------------------------------------
def _model_sampling(patcher):
    """The model sampling this MODEL samples with: an object patch (a ModelSamplingDiscrete node
    turning a finetune into v-prediction, say) takes precedence over the base model's own."""
    get = getattr(patcher, "get_model_object", None)
    if get is not None:
        return get("model_sampling")
    return getattr(patcher, "object_patches", {}).get("model_sampling", patcher.model.model_sampling)


def _noising(ms) -> str:
    """"ddpm" when the model noises as x_σ = x₀ + σ·ε (every EPS / V / EDM variant, the DDPM
    convention up to the scale 1/√ᾱ), "flow" when as x_σ = (1 − σ)·x₀ + σ·ε (rectified flow: SD3,
    Flux), else raise. Asked of ComfyUI's own `noise_scaling`, so it holds whatever the classes
    are called in a given ComfyUI version."""
    sigma = torch.tensor([0.3, 0.5]).view(2, 1)
    kind = None
    try:
        clean = ms.noise_scaling(sigma, torch.zeros(2, 1), torch.ones(2, 1))
        noisy = ms.noise_scaling(sigma, torch.ones(2, 1), torch.zeros(2, 1))
        if torch.allclose(clean, torch.ones(2, 1)) and torch.allclose(noisy, sigma):
            kind = "ddpm"
        elif torch.allclose(clean, 1 - sigma) and torch.allclose(noisy, sigma):
            kind = "flow"
    except Exception:  # a sampling without this interface is neither
        kind = None
    if kind is None or not hasattr(ms, "sigmas"):
        kinds = ", ".join(c.__name__ for c in type(ms).__mro__[1:] if c.__module__.startswith("comfy"))
        raise ConceptEditError(f"this model's prediction type ({kinds or type(ms).__name__}) is not supported by "
                               "the training methods and audits: they need an EPS, v-prediction or rectified-flow "
                               "model (SD1.x, SD2.x, SDXL, SD3, Flux and their finetunes)")
    return kind


# A flow model's σ = 1 is pure noise, which has no DDPM equivalent (ᾱ = 0); its last step is read at this σ.
_FLOW_SIGMA_MAX = 1.0 - 1e-3


def _flow_ddpm_sigma(sigma_flow: torch.Tensor) -> torch.Tensor:
    """The DDPM σ (x_t/√ᾱ = x₀ + σ·ε) of the same noise level as flow σ_f ((1 − σ_f)·x₀ + σ_f·ε):
    both are x₀ + (σ_f / (1 − σ_f))·ε up to scale."""
    s = sigma_flow.clamp(1e-6, _FLOW_SIGMA_MAX)
    return s / (1 - s)


def _is_inpaint(base) -> bool:
    # 2024-03 ComfyUI flags inpainting UNets with `inpaint_model`; current ComfyUI with `concat_keys`
    return bool(getattr(base, "inpaint_model", False)) or "masked_image" in tuple(getattr(base, "concat_keys", ()))


def _blank_inpaint_concat(x: torch.Tensor) -> torch.Tensor:
    """What ComfyUI feeds an inpainting UNet when it generates a whole picture (no mask, no image): a
    mask of ones and the latent of a blank picture (ComfyUI's `blank_inpaint_image_like` values)."""
    b, _, h, w = x.shape
    blank = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380], dtype=x.dtype, device=x.device).view(1, 4, 1, 1)
    return torch.cat([torch.ones(b, 1, h, w, dtype=x.dtype, device=x.device), blank.expand(b, 4, h, w)], 1)


class ComfyDenoiser:
    """`editing.hosts.Denoiser` and `Trainable` over a ComfyUI MODEL (+ the CLIP that encodes its prompts)."""

    def __init__(self, model, clip, *, sampler: str = "euler", scheduler: str = "normal",
                 latent_hw: int | tuple[int, int] | None = None, ctx: RunContext | None = None,
                 family: Family | None = None, base: Callable[[], Mapping[str, torch.Tensor]] | None = None,
                 cache_tag: Callable[[], str] | None = None):
        """`latent_hw`: the latent side, or (height, width), that this host generates at; None = the
        layout's native size (a layout no table names: SDXL's if it takes y, else SD1's). `family`,
        `base` (the unpatched weights) and `cache_tag` come from a `view.ModelView` when there is one,
        so that the model is read once per call; otherwise they are read from `model` when asked."""
        self.model = model
        self.text = clip if isinstance(clip, ComfyText) else ComfyText(clip)
        self.family = family or model_family(model)
        self._base, self._cache_tag = base, cache_tag
        self.sampler, self.scheduler = sampler, scheduler
        hw = latent_hw or self.family.native_latent
        self.latent_size = (int(hw[0]), int(hw[1])) if isinstance(hw, (tuple, list)) else (int(hw), int(hw))
        self.latent_hw = self.latent_size[0]
        self.ctx = ctx or RunContext()
        self._said_cfg1 = False  # the CFG-1 note of a guidance-distilled model is logged once per host

    @property
    def latent_dims(self) -> int:
        """Spatial dimensions of this model's latents: 2 (images), 3 for the video-shaped latents of
        Wan and Qwen-Image ([B, C, frames, H, W]; the pack draws one frame)."""
        return int(getattr(getattr(self.model.model, "latent_format", None), "latent_dimensions", 2))

    @property
    def latent_channels(self) -> int:
        """Channels of this model's latents, its latent format's (4 on SD1/SD2/SDXL, 16 on SD3 and
        Flux): what every picture the pack draws from noise (DDIM, red team, training) starts with."""
        return int(getattr(getattr(self.model.model, "latent_format", None), "latent_channels", 4))

    def base_weights(self) -> Mapping[str, torch.Tensor]:
        """ComfyUI key -> unpatched weight (`editing.hosts.base_weights`: what masks resolve against)."""
        return self._base() if self._base is not None else original_weights(self.model)

    @property
    def cache_tag(self) -> str:
        """Names this model in cached training latents (its fingerprint)."""
        return self._cache_tag() if self._cache_tag is not None else str(model_fingerprint(self.model))

    def modules(self) -> Mapping[str, torch.nn.Module]:
        import comfy.model_management as mm
        mm.load_models_gpu([self.model])
        return dict(self.model.model.diffusion_model.named_modules())

    @property
    def guidance_distilled(self) -> bool:
        """Whether the model is guidance-distilled (Flux-dev's guidance embedding): it samples at CFG 1
        (`editing.diffusion.sampling_cfg`) and its predictions take the embedding at `FLUX_GUIDANCE`."""
        return bool(getattr(getattr(self.model.model.diffusion_model, "params", None), "guidance_embed", False))

    def sample(self, prompts: Sequence[str], *, steps: int, cfg: float, seed: int, negative: str = "",
               on_step: Callable[[int], None] | None = None, latent: torch.Tensor | None = None,
               noise_per_prompt: bool = False) -> torch.Tensor:
        """Latents as ComfyUI's sampler returns them (the VAE's scale; `latent_in` gives the UNet's).
        `noise_per_prompt`: every prompt starts from the noise of a batch of one with `seed` (ComfyUI's
        own noise indices, all 0), instead of one draw over the whole batch. A guidance-distilled
        model samples at CFG 1 whatever `cfg` says (`sampling_cfg`), without its negative branch."""
        import comfy.sample
        if self.guidance_distilled and not self._said_cfg1:
            log.info("%s is guidance-distilled: the pack samples it at CFG 1 (its guidance embedding at %s)",
                     self.family.label, FLUX_GUIDANCE)
            self._said_cfg1 = True
        cfg = sampling_cfg(self, cfg)
        n = len(prompts)
        positive = self.text.conditioning(list(prompts))
        negative_c = self.text.conditioning([negative] * n)
        if latent is None:
            latent = torch.zeros(n, self.latent_channels, *self.latent_size)
        fix = getattr(comfy.sample, "fix_empty_latent_channels", None)  # video-shaped latents, as KSampler does
        latent = fix(self.model, latent) if fix is not None else latent
        noise = comfy.sample.prepare_noise(latent, seed, [0] * latent.shape[0] if noise_per_prompt else None)

        def callback(step, x0, x, total):
            self.ctx.check()
            if on_step is not None and step + 1 < steps:
                on_step(step + 1)

        if on_step is not None:
            on_step(0)
        # an inpainting UNet generates a whole picture as ComfyUI does it: everything masked for repaint
        mask = torch.ones(latent.shape[0], 1, *latent.shape[2:]) if _is_inpaint(self.model.model) else None
        out = comfy.sample.sample(self.model, noise, steps, cfg, self.sampler, self.scheduler, positive, negative_c,
                                  latent, denoise=1.0, noise_mask=mask, callback=callback, disable_pbar=True, seed=seed)
        return out

    def latent_in(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled latents (VAE scale) -> the UNet's scale, where x₀ of the training objectives lives."""
        return self.model.model.process_latent_in(x)

    # ---- training objectives ---------------------------------------------------------------
    def unet(self) -> torch.nn.Module:
        """The UNet that runs, with this MODEL's patches merged (loads it on the device)."""
        import comfy.model_management as mm
        mm.load_models_gpu([self.model])
        return self.model.model.diffusion_model

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..999 of the model's discrete schedule (σ² = (1 − ᾱ)/ᾱ). A flow model's
        schedule is its own σ_f at the same 1000 steps (its shift included), as the DDPM ᾱ of equal
        noise level (`_flow_ddpm_sigma`), so every objective written in ε sees the levels the model
        samples at."""
        ms = _model_sampling(self.model)
        s = ms.sigmas.float()
        if _noising(ms) == "flow":
            s = _flow_ddpm_sigma(s)
        return 1.0 / (1.0 + s ** 2)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-timestep weights turning an ε-MSE into the model's own training loss
        (`editing.diffusion.objective_weights`): 1/(1 − σ_f)² on a rectified-flow model, whose
        velocity error is the ε error divided by 1 − σ_f at the same x_σf; None (the ε-MSE) otherwise."""
        ms = _model_sampling(self.model)
        if _noising(ms) != "flow":
            return None
        s = ms.sigmas[t.reshape(-1).to(ms.sigmas.device).long()].float().clamp(1e-6, _FLOW_SIGMA_MAX)
        return (1.0 / (1.0 - s) ** 2).to(t.device)

    def adm(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """SDXL's vector conditioning for `pooled` (ComfyUI's own `encode_adm`: pooled ‖ size
        embeddings, at the latent size this host samples, no crop); None for models without one."""
        base = self.model.model
        if self.reads_pooled:  # Flux.1's vector_in, HiDream's p_embedder: the pooled vector itself
            if pooled is None:
                raise InvalidInputError(f"this {self.family.label} model needs the pooled text embedding: connect its "
                                        f"own CLIP ({clip_hint(self.family)}the checkpoint loader's CLIP output)")
            return pooled.reshape(batch if pooled.shape[0] == batch else pooled.shape[0], -1).expand(batch, -1)
        if not getattr(base, "adm_channels", 0):
            return None
        if pooled is None:
            raise InvalidInputError(f"this {self.family.label} model needs the pooled text embedding: encode the "
                                    "prompts with ComfyText.encode_with_pooled and pass its second output")
        h, w = (8 * n for n in self.latent_size)
        y = base.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                            target_height=h, device=pooled.device, seed=0)
        if y.shape[0] != batch:
            y = y.expand(batch, -1) if y.shape[0] == 1 else y
        return y

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The model's ε-prediction at DDPM-scaled x_t = √ᾱ x₀ + √(1−ᾱ) ε, integer timesteps t [B],
        text context [B, T, d] and, for SDXL-conditioned models, y = `adm(pooled, B)`; whatever the
        model predicts (ε, v, EDM), differentiable w.r.t. x, context, y and any hooked adapter.

        Every training objective, audit and presence score calls the model through here, and all of
        them are written in ε (ESD's guidance target, GA/RGD's truncation m, distillation, presence
        gains), so the output is converted to ε rather than the targets to the model's own type: one
        conversion in one place, and losses and scores mean the same on EPS and V models. The weights
        still train through the model's own output; for a v-model ε̂ − ε = √ᾱ·(v̂ − v), so the ε-MSE
        is the v-MSE weighted by ᾱ_t.

        The conversion is ComfyUI's own: `apply_model` takes x in its σ-space x_σ = x₀ + σε =
        x_t/√ᾱ (σ = `model_sampling.sigmas[t]`) and returns the denoised x₀ by the model's
        `calculate_denoised`, so ε = (x_σ − x₀)/σ for any prediction type it knows."""
        base = self.model.model
        if (getattr(base, "adm_channels", 0) or self.reads_pooled) and y is None:
            raise InvalidInputError(f"this {self.family.label} model needs its vector conditioning y: pass "
                                    "y = adm(pooled, batch) from the prompts' pooled text embedding")
        self.unet()  # loads this MODEL: its weight patches and object patches (model_sampling) in place
        ms = base.model_sampling
        kind = _noising(ms)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        sigma = ms.sigmas[t.to(ms.sigmas.device).long()].float().clone().to(x.device)
        if kind == "flow":
            # x_t/√ᾱ = x₀ + σ_d·ε is the flow model's x_σf up to the factor 1 − σ_f = 1/(1 + σ_d)
            sigma = sigma.clamp(1e-6, _FLOW_SIGMA_MAX)
            sd = _flow_ddpm_sigma(sigma).view(-1, *([1] * (x.ndim - 1)))
            sf = sigma.view_as(sd)
            x_in = x.float() * (1.0 + sd ** 2).sqrt() / (1.0 + sd)
            x0 = self._apply(base, x_in, sigma, context, y)
            return (x_in - (1 - sf) * x0.float()) / sf
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        x_sigma = x.float() * (1.0 + s ** 2).sqrt()
        x0 = self._apply(base, x_sigma, sigma, context, y)
        return (x_sigma - x0.float()) / s

    def _apply(self, base, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None):
        """`apply_model` on the batch; a batch whose prompts' contexts have different own lengths (LLM
        encoders, `ComfyText.own_rows`) runs once per length, each group on its rows without padding:
        ComfyUI samples every prompt at its own length, and these DiTs take no text mask for a padded
        batch, so zero rows would change what the model predicts. Differentiable throughout."""
        own = getattr(self.text, "own_rows", None)
        rows = own(context) if own is not None else None
        if not rows or (len(set(rows)) == 1 and rows[0] == context.shape[1]):
            return base.apply_model(x, sigma, **self._conds(base, x, context, y))
        # one length shorter than the context (a batch padded to a longer prompt that is not in it,
        # contexts built outside the text encoder) is cut as a group of mixed lengths is
        left = bool(getattr(self.text, "pads_left", False))
        parts, order = [], []
        for n in sorted(set(rows)):
            idx = [i for i, r in enumerate(rows) if r == n]
            sel = torch.tensor(idx, device=x.device)
            ctx = context[sel][:, context.shape[1] - n:] if left else context[sel][:, :n]
            xs, ys = x[sel], (y[sel] if y is not None else None)
            parts.append(base.apply_model(xs, sigma[sel.to(sigma.device)], **self._conds(base, xs, ctx, ys)))
            order += idx
        out = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out[inverse.to(out.device)]

    @property
    def reads_pooled(self) -> bool:
        """Whether the diffusion model reads the pooled text vector as it is (its y): a DiT whose
        adapter says so and which has the pooled projection (Flux.1's vector_in; Flux.2 and Chroma
        have none)."""
        adapter = self.family.adapter
        return bool(adapter is not None and adapter.pooled_y and self.family.projection_keys("pooled"))

    def _conds(self, base, x: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> dict:
        """What `apply_model` takes besides x and σ. SD-style UNets, Flux.1 and SD3: the context, y
        and (inpainting UNets, Flux-dev) the blank concat and the guidance, as always. Every other
        DiT: what ComfyUI's own `extra_conds` makes of the context and y for its sampler (Flux.2
        pads the text to 512 rows, Chroma takes a guidance of 0, Lumina the token count, ...), so
        the prediction is the one ComfyUI samples with. Every tensor stays differentiable."""
        if self.family.kind in ("unet", "sd3") or (self.family.kind == "flux" and self.family.variant == "flux1"):
            extra = {"c_concat": _blank_inpaint_concat(x)} if _is_inpaint(base) else {}
            if self.guidance_distilled:
                extra["guidance"] = torch.full((x.shape[0],), FLUX_GUIDANCE, device=x.device)
            return {"c_crossattn": context, "y": y, **extra}
        h, w = (8 * n for n in x.shape[-2:])
        # what the CLIP gave besides the context for these prompts (HiDream's Llama states, attention
        # masks), as CLIPTextEncode puts it in the conditioning: `ComfyText.extras_for`
        extras = getattr(self.text, "extras_for", None)
        extras = {"cross_attn": context, **(extras(context) if extras is not None else {})}
        conds = base.extra_conds(**extras, pooled_output=y, noise=x, device=x.device, width=w, height=h)
        return {k: c.process_cond(batch_size=x.shape[0], device=x.device).cond for k, c in conds.items()}

"""ComfyUI MODEL/CLIP -> the library's host interfaces (`editing.hosts`), and Edit -> patches.

Everything here runs inside ComfyUI (or a headless ComfyUI from `locate.ensure_comfy`). The input
ModelPatcher/CLIP objects are never modified: edits go onto clones as patches.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch

from ..editing.arch import Family, detect_family, fingerprint
from ..editing.edit import Edit
from ..editing.errors import ConceptEditError, InvalidInputError
from ..editing.hosts import RunContext

log = logging.getLogger(__name__)

DEFAULT_LATENT = {"tiny": 32, "sd1": 64, "sd2": 96, "sdxl": 128}


# ---- progress and cancel -------------------------------------------------------------------
def run_context(total_hint: int | None = None) -> RunContext:
    """A RunContext wired to ComfyUI's progress bar and its Cancel button."""
    import comfy.model_management as mm
    import comfy.utils

    bars: dict[int, object] = {}

    def progress(done: int, total: int) -> None:
        bar = bars.get(total)
        if bar is None:
            bar = bars[total] = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    def should_stop() -> bool:
        # raises ComfyUI's own InterruptProcessingException, which its executor reports as "interrupted"
        mm.throw_exception_if_processing_interrupted()
        return False

    return RunContext(progress=progress, should_stop=should_stop, device=mm.get_torch_device())


# ---- weights ---------------------------------------------------------------------------------
def original_weights(patcher) -> dict[str, torch.Tensor]:
    """Key -> the *unpatched* weight (a loaded clone may have patched weights in place)."""
    sd = patcher.model_state_dict()
    backup = getattr(patcher, "backup", None) or {}
    out = {}
    for k, w in sd.items():
        b = backup.get(k)
        out[k] = getattr(b, "weight", b) if b is not None else w
    return out


def model_family(model) -> Family:
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    return detect_family(shapes)


def model_fingerprint(model) -> dict:
    return fingerprint(model_family(model), original_weights(model))


def clip_state(clip) -> dict[str, torch.Tensor]:
    return original_weights(clip.patcher)


def apply_edit(model, clip, edit: Edit, strength: float = 1.0, strict_weights: bool = False):
    """Clone MODEL (and CLIP when the edit touches the text encoder) and add the edit as patches.

    Returns (model', clip', warnings). Validates the family, layout and every key's shape
    before anything is applied; raises if any key fails to match (never a silent no-op)."""
    if model is None:
        raise InvalidInputError("connect a MODEL")
    edit.check_finite()
    fam = model_family(model)
    unet_w = original_weights(model)
    shapes = {k: tuple(v.shape) for k, v in unet_w.items()}
    te_keys = edit.text_encoder_keys()
    te_w: dict[str, torch.Tensor] = {}
    if te_keys:
        if clip is None:
            raise InvalidInputError(f"this {edit.method} edit changes the text encoder: connect the CLIP too")
        te_w = clip_state(clip)
        shapes.update({k: tuple(v.shape) for k, v in te_w.items()})
    warnings = edit.validate_for(fam.name, shapes, fingerprint(fam, unet_w), strict_weights=strict_weights)

    out_model, out_clip = model, clip
    unet_patches, te_patches = {}, {}
    for k, change in edit.changes.items():
        base = te_w.get(k) if k in te_w else unet_w.get(k)
        if change.kind == "mask":
            # −W⊙M as a sparse COO "diff": memory O(pruned weights), not O(layer) (SDXL has 70
            # 1280×5120 layers); ComfyUI adds it into the weight when it loads the model.
            d = change.sparse_delta(base).to(device="cpu")
        else:
            d = change.delta(None, dtype=base.dtype, device="cpu")
        (te_patches if k in te_w else unet_patches)[k] = (d,)
    if unet_patches:
        out_model = model.clone()
        got = set(out_model.add_patches(unet_patches, strength))
        _check_matched(unet_patches, got, "MODEL")
    if te_patches:
        out_clip = clip.clone()
        got = set(out_clip.add_patches(te_patches, strength))
        _check_matched(te_patches, got, "CLIP")
    return out_model, out_clip, warnings


def _check_matched(patches: Mapping, got: set, what: str) -> None:
    missing = [k for k in patches if k not in got]
    if missing:
        raise ConceptEditError(f"{len(missing)} of {len(patches)} keys of the edit matched nothing in the {what} "
                               f"(first: {missing[0]}); nothing was applied")


# ---- text ----------------------------------------------------------------------------------------
class ComfyText:
    """`editing.hosts.TextEncoder` over a ComfyUI CLIP."""

    def __init__(self, clip, device=None):
        if clip is None:
            raise InvalidInputError("connect a CLIP")
        self.clip = clip
        self.device = device

    def _encode_one(self, prompt: str):
        tokens = self.clip.tokenize(prompt)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        if cond.shape[1] > 77:
            log.warning("prompt longer than 75 tokens is cut to the first 77: %r", prompt[:60])
            cond = cond[:, :77]
        return cond, pooled

    def encode_with_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        conds, pools = zip(*(self._encode_one(p) for p in prompts))
        cond = torch.cat(conds)
        pooled = torch.cat(pools) if all(p is not None for p in pools) else None
        if self.device is not None:
            cond = cond.to(self.device)
            pooled = pooled.to(self.device) if pooled is not None else None
        return cond, pooled

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_with_pooled(prompts)[0]

    def token_ids(self, prompt: str) -> list[int]:
        tokens = self.clip.tokenize(prompt)
        first = tokens[sorted(tokens)[0]] if "l" not in tokens else tokens["l"]
        return [int(t[0]) for t in first[0]]

    def conditioning(self, prompts: Sequence[str]):
        cond, pooled = self.encode_with_pooled(prompts)
        extra = {"pooled_output": pooled} if pooled is not None else {}
        return [[cond, extra]]


# ---- denoiser ------------------------------------------------------------------------------------
class ComfyDenoiser:
    """`editing.hosts.Denoiser` over a ComfyUI MODEL (+ the CLIP that encodes its prompts)."""

    def __init__(self, model, clip, *, sampler: str = "euler", scheduler: str = "normal",
                 latent_hw: int | None = None, ctx: RunContext | None = None):
        self.model = model
        self.text = clip if isinstance(clip, ComfyText) else ComfyText(clip)
        self.family = model_family(model)
        self.sampler, self.scheduler = sampler, scheduler
        self.latent_hw = latent_hw or DEFAULT_LATENT[self.family.name]
        self.ctx = ctx or RunContext()

    def modules(self) -> Mapping[str, torch.nn.Module]:
        import comfy.model_management as mm
        mm.load_models_gpu([self.model])
        return dict(self.model.model.diffusion_model.named_modules())

    def sample(self, prompts: Sequence[str], *, steps: int, cfg: float, seed: int, negative: str = "",
               on_step: Callable[[int], None] | None = None, latent: torch.Tensor | None = None) -> torch.Tensor:
        import comfy.sample
        n = len(prompts)
        positive = self.text.conditioning(list(prompts))
        negative_c = self.text.conditioning([negative] * n)
        if latent is None:
            latent = torch.zeros(n, 4, self.latent_hw, self.latent_hw)
        noise = comfy.sample.prepare_noise(latent, seed, None)

        def callback(step, x0, x, total):
            self.ctx.check()
            if on_step is not None and step + 1 < steps:
                on_step(step + 1)

        if on_step is not None:
            on_step(0)
        out = comfy.sample.sample(self.model, noise, steps, cfg, self.sampler, self.scheduler, positive, negative_c,
                                  latent, denoise=1.0, callback=callback, disable_pbar=True, seed=seed)
        return out

    # ---- training objectives ---------------------------------------------------------------
    def unet(self) -> torch.nn.Module:
        """The UNet that runs, with this MODEL's patches merged (loads it on the device)."""
        import comfy.model_management as mm
        mm.load_models_gpu([self.model])
        return self.model.model.diffusion_model

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..999 of the model's discrete schedule (σ² = (1 − ᾱ)/ᾱ)."""
        s = self.model.model.model_sampling.sigmas.float()
        return 1.0 / (1.0 + s ** 2)

    def adm(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """SDXL's vector conditioning for `pooled` (ComfyUI's own `encode_adm`: pooled ‖ size
        embeddings, at the latent size this host samples, no crop); None for models without one."""
        base = self.model.model
        if not getattr(base, "adm_channels", 0):
            return None
        if pooled is None:
            raise InvalidInputError(f"this {self.family.label} model needs the pooled text embedding: encode the "
                                    "prompts with ComfyText.encode_with_pooled and pass its second output")
        size = self.latent_hw * 8
        y = base.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0, target_width=size,
                            target_height=size, device=pooled.device, seed=0)
        if y.shape[0] != batch:
            y = y.expand(batch, -1) if y.shape[0] == 1 else y
        return y

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """ε-prediction at DDPM-scaled x_t = √ᾱ x₀ + √(1−ᾱ) ε and integer timesteps t (differentiable
        w.r.t. x and context). For v-prediction models this returns the raw model output."""
        unet = self.unet()
        dtype = next(unet.parameters()).dtype
        return unet(x.to(dtype), timesteps=t, context=context.to(dtype), y=None if y is None else y.to(dtype)).float()

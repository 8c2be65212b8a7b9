"""ComfyUI MODEL/CLIP -> the library's host interfaces (`editing.hosts`), and Edit -> patches.

Everything here runs inside ComfyUI (or a headless ComfyUI from `locate.ensure_comfy`). The input
ModelPatcher/CLIP objects are never modified: edits go onto clones as patches.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch

from ..editing.arch import Family, discover_layout, fingerprint
from ..editing.diffusion import sampling_cfg
from ..editing.edit import Edit
from ..editing.errors import ConceptEditError, InvalidInputError
from ..editing.hosts import RunContext

log = logging.getLogger(__name__)
# the guidance a guidance-distilled Flux (Flux-dev) is run at: ComfyUI's default, as its FluxGuidance node
FLUX_GUIDANCE = 3.5



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


def model_family(model, clip=None) -> Family:
    """The layout read from this MODEL (and its CLIP's text encoders when given): its keys and
    shapes, with ComfyUI's own UNet config for diffusers names when no table names the layout."""
    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    text = {k: tuple(v.shape) for k, v in clip.patcher.model_state_dict().items()} if clip is not None else None
    return discover_layout(shapes, unet_config=config, text_shapes=text)


def model_fingerprint(model) -> dict:
    return fingerprint(model_family(model), original_weights(model))


def clip_state(clip) -> dict[str, torch.Tensor]:
    return original_weights(clip.patcher)


def apply_edit(model, clip, edit: Edit, strength: float = 1.0, strict_weights: bool = False):
    """Clone MODEL (and CLIP when the edit touches the text encoder) and add the edit as patches.

    Returns (model', clip', warnings). Checks the edit's scope (`editing.scope`), the family, layout
    and every key's shape before anything is applied; raises if any key fails to match (never a
    silent no-op). Patches are in the running ComfyUI's own form (`edit_patches`)."""
    from .view import ModelView
    return ModelView(model, clip).apply(edit, strength, strict_weights=strict_weights)


def add_edit_patches(model, clip, edit: Edit, unet_w: Mapping[str, torch.Tensor], te_w: Mapping[str, torch.Tensor],
                     strength: float = 1.0):
    """(model', clip'): clones carrying `edit` as patches (an input is returned as it is when the
    edit has no key of it); `unet_w`/`te_w` are the unpatched weights masks are resolved against.
    Every patch must match a key, else nothing is returned."""
    patches = edit_patches(edit, {k: (te_w[k] if k in te_w else unet_w[k]) for k in edit.changes})
    unet_patches = {k: p for k, p in patches.items() if k not in te_w}
    te_patches = {k: p for k, p in patches.items() if k in te_w}
    out_model, out_clip = model, clip
    if unet_patches:
        out_model = model.clone()
        got = set(out_model.add_patches(unet_patches, strength))
        _check_matched(unet_patches, got, "MODEL")
    if te_patches:
        out_clip = clip.clone()
        got = set(out_clip.add_patches(te_patches, strength))
        _check_matched(te_patches, got, "CLIP")
    return out_model, out_clip


def patched_weights(patcher, keys: Sequence[str], base: Mapping[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Key -> the weight this MODEL computes with (its unpatched weight plus its own patches), in
    float32, by ComfyUI's own patch arithmetic, whatever is loaded where: a low-VRAM load keeps some
    modules unpatched and patches them per forward, so reading module weights would mix the two."""
    import comfy.lora
    base = base if base is not None else original_weights(patcher)
    calc = getattr(comfy.lora, "calculate_weight", None)  # current ComfyUI; 2024 has the patcher method
    out = {}
    for k in keys:
        w = base[k].detach().to(device="cpu", dtype=torch.float32, copy=True)
        ps = patcher.patches.get(k)
        if ps:
            w = calc(ps, w, k) if calc is not None else patcher.calculate_weight(ps, w, k)
        out[k] = w
    return out


_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))
_PATCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _module_name(key: str) -> str:
    return key[:-len(".weight")] if key.endswith(".weight") else key


def edit_state_dict(edit: Edit, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(kohya-style state dict, key map) of `edit` for `comfy.lora.load_lora`: per changed key a
    module named after the key, low-rank changes as ``lora_up``/``lora_down`` with ``alpha`` = rank
    (scale 1), dense deltas as ``diff`` (their own float dtype, never the weight's), masks as a
    sparse COO ``diff`` of −W⊙M. `weights` maps each changed key to its base weight (masks need its
    values; only dtype and device are read otherwise).

    Weights stored in float8 are refused: ComfyUI rounds a patched weight back to float8 (3 mantissa
    bits), which keeps too little of a low-rank or dense change to be that edit, and current versions
    round stochastically over the whole weight, which moves untouched weights of a mask's layer by an
    ulp and makes even strength 0 differ from the original."""
    sd: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    for key, change in edit.changes.items():
        base = weights[key]
        if base.dtype in _FLOAT8:
            raise InvalidInputError(
                f"{key} is stored as {base.dtype} in this model: ComfyUI rounds a patched float8 weight back to "
                f"float8, which cannot hold the {edit.method} edit exactly, so nothing was applied. Load the model "
                "with weight_dtype 'default' (float16/bfloat16) to apply this edit.")
        if not base.is_floating_point() or hasattr(base, "tensor_type"):  # GGUF / integer-quantized weights
            raise InvalidInputError(
                f"{key} is stored quantized ({getattr(base, 'tensor_type', base.dtype)}) in this model: an exact "
                f"{edit.method} edit cannot be added to it, so nothing was applied. Load the unquantized checkpoint "
                "(safetensors, float16/bfloat16) to apply this edit, then quantize the result if you need to.")
        name = _module_name(key)
        if name in key_map:
            raise InvalidInputError(f"two keys of the edit name the module {name}")
        key_map[name] = key
        if change.kind == "lowrank":
            up, down = change.tensors["up"], change.tensors["down"]
            sd[f"{name}.lora_up.weight"] = up if up.dtype in _PATCH_FLOATS else up.float()
            sd[f"{name}.lora_down.weight"] = down if down.dtype in _PATCH_FLOATS else down.float()
            sd[f"{name}.alpha"] = torch.tensor(float(up.shape[1]))  # the loader's scale alpha / rank = 1
        elif change.kind == "mask":
            # −W⊙M as a sparse COO diff: memory O(pruned weights), not O(layer) (SDXL has 70 1280×5120
            # layers); its values are the weights themselves, so W + ΔW is exactly 0 where pruned.
            sd[f"{name}.diff"] = change.sparse_delta(base).to(device="cpu")
        else:
            d = change.tensors["delta"]
            sd[f"{name}.diff"] = d if d.dtype in _PATCH_FLOATS else d.float()
    return sd, key_map


def edit_patches(edit: Edit, weights: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """`edit` as ComfyUI patches keyed by patch key, made by the running ComfyUI's own LoRA loader
    (`comfy.lora.load_lora`, the route LoraLoader takes): ("lora", …) tuples in the 2024 copy,
    `comfy.weight_adapter` objects in current ComfyUI. Low-rank changes stay low-rank (an SDXL rank-4
    LoRA is never expanded to its dense ΔW); ComfyUI multiplies them out per weight when it loads the
    model, in float32, and rounds the sum once to the weight's dtype."""
    import comfy.lora
    sd, key_map = edit_state_dict(edit, weights)
    patches = comfy.lora.load_lora(sd, key_map)
    missing = [k for k in key_map.values() if k not in patches]
    if missing:
        raise ConceptEditError(f"ComfyUI's LoRA loader turned {len(missing)} of the edit's {len(key_map)} changes "
                               f"into no patch (first: {missing[0]}); nothing was applied")
    return patches


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
        length, runs = self._runs()
        if cond.shape[1] > length:
            log.warning("prompt longer than the context (%d tokens) is cut to its first %d: %r", length, length,
                        prompt[:60])
            # each run keeps the empty prompt's share of rows (SD3: CLIP's 77, then T5's 77)
            parts, at = [], 0
            for k, _, _ in runs:
                parts.append(cond[:, at:at + self._run_rows[k]])
                at += sum(len(chunk) for chunk in tokens[k])
            cond = torch.cat(parts, dim=1)
        return cond, pooled

    def _runs(self) -> tuple[int, list[tuple[str, int, int]]]:
        """(context length of the empty prompt, [(tokenizer key, first position after BOS, EOS id)]):
        which encoders' tokens make up the context rows, in order. SD1/SD2/SDXL: the CLIP's 77
        positions (SDXL's two encoders share them); Flux: T5's (no BOS); SD3: CLIP's then T5's.
        Read off the empty prompt's context length, so any CLIP class ComfyUI loads is laid out
        by what it returns."""
        cached = getattr(self, "_runs_cache", None)
        if cached is not None:
            return cached
        tokens = self.clip.tokenize("")
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        length = int(cond.shape[1])
        self._width = int(cond.shape[-1])
        self._pooled_width = int(pooled.shape[-1]) if pooled is not None else 0
        sizes = {k: len(v[0]) for k, v in tokens.items()}
        clip_key = next((k for k in ("l", "g", "h") if k in sizes), None)
        t5_key = next((k for k in sizes if k not in ("l", "g", "h")), None)
        order = [[clip_key], [t5_key], [clip_key, t5_key]]
        chosen = next((o for o in order if None not in o and sum(sizes[k] for k in o) == length),
                      [clip_key or sorted(sizes)[0]])
        # the context rows each run fills for the empty prompt (a layout no rule matches: all of them)
        self._run_rows = ({k: sizes[k] for k in chosen} if sum(sizes[k] for k in chosen) == length
                          else {chosen[0]: length})
        runs = []
        for k in chosen:
            tok = getattr(self.clip.tokenizer, f"clip_{k}", None) or getattr(self.clip.tokenizer, k, None)
            start = int(getattr(tok, "tokens_start", 1))
            ids = [int(t[0]) for t in tokens[k][0]]
            end = getattr(tok, "end_token", None)
            runs.append((k, start, int(end) if end is not None else ids[start]))
        self._runs_cache = (length, runs)
        return self._runs_cache

    @property
    def context_width(self) -> int:
        """Features per context row (768 on SD1, 2048 on SDXL, 4096 on Flux and SD3)."""
        self._runs()
        return self._width

    @property
    def pooled_width(self) -> int:
        """Features of the pooled vector (0 when the CLIP gives none): Flux 768, SD3 2048."""
        self._runs()
        return self._pooled_width

    @property
    def context_length(self) -> int:
        """Rows of the empty prompt's context (77 on SD, 256 on Flux, 154 on SD3): longer prompts are cut to it."""
        return self._runs()[0]

    def token_segments(self, prompt: str) -> list[tuple[int, list[int], int, int]]:
        """The context's token runs for `prompt`: [(first context row, ids, first position after BOS,
        EOS id)] (`editing.uce.closed_form.token_segments`)."""
        tokens = self.clip.tokenize(prompt)
        out, offset = [], 0
        for k, start, eos in self._runs()[1]:
            ids = [int(t[0]) for t in tokens[k][0]]
            out.append((offset, ids, start, eos))
            offset += len(ids)
        return out

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
        """The ids of the first encoder whose tokens make up the context (CLIP-L's on SD, T5's on Flux)."""
        tokens = self.clip.tokenize(prompt)
        return [int(t[0]) for t in tokens[self._runs()[1][0][0]][0]]

    def conditioning(self, prompts: Sequence[str]):
        cond, pooled = self.encode_with_pooled(prompts)
        extra = {"pooled_output": pooled} if pooled is not None else {}
        return [[cond, extra]]


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
        if self.family.kind == "flux":  # Flux reads the pooled CLIP-L vector itself (its vector_in)
            if pooled is None:
                raise InvalidInputError("this Flux model needs the pooled CLIP-L embedding: connect its own CLIP "
                                        "(clip_l + t5xxl)")
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
        if (getattr(base, "adm_channels", 0) or self.family.kind == "flux") and y is None:
            raise InvalidInputError(f"this {self.family.label} model needs its vector conditioning y: pass "
                                    "y = adm(pooled, batch) from the prompts' pooled text embedding")
        self.unet()  # loads this MODEL: its weight patches and object patches (model_sampling) in place
        ms = base.model_sampling
        kind = _noising(ms)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        sigma = ms.sigmas[t.to(ms.sigmas.device).long()].float().clone().to(x.device)
        extra = {"c_concat": _blank_inpaint_concat(x)} if _is_inpaint(base) else {}
        if self.guidance_distilled:
            extra["guidance"] = torch.full((x.shape[0],), FLUX_GUIDANCE, device=x.device)
        if kind == "flow":
            # x_t/√ᾱ = x₀ + σ_d·ε is the flow model's x_σf up to the factor 1 − σ_f = 1/(1 + σ_d)
            sigma = sigma.clamp(1e-6, _FLOW_SIGMA_MAX)
            sd = _flow_ddpm_sigma(sigma).view(-1, *([1] * (x.ndim - 1)))
            sf = sigma.view_as(sd)
            x_in = x.float() * (1.0 + sd ** 2).sqrt() / (1.0 + sd)
            x0 = base.apply_model(x_in, sigma, c_crossattn=context, y=y, **extra)
            return (x_in - (1 - sf) * x0.float()) / sf
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        x_sigma = x.float() * (1.0 + s ** 2).sqrt()
        x0 = base.apply_model(x_sigma, sigma, c_crossattn=context, y=y, **extra)
        return (x_sigma - x0.float()) / s

"""What the library needs from a host (ComfyUI, the headless CLI, diffusers, tests).

The algorithms never import a host. They receive these small objects, so the same code serves
ComfyUI nodes, the command line and the tests.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch

from .errors import Cancelled, InvalidInputError

if TYPE_CHECKING:  # annotations only: the layouts and edits import this module
    from .arch import Family
    from .edit import Edit


class Text(Protocol):
    """A model's text encoder(s) as the methods reach them. A host implements the parts its methods
    use: every method encodes prompts (the first part); EMCID and the red team's hooks run the
    encoders' own layers on token ids (the second); the red team's soft prompts replace a
    placeholder token's embedding (the third). ComfyUI's: `comfy_host.text.ComfyText` (the first),
    `comfy_host.text_hooks.ComfyTextModel` (the second) and `ComfySoftText` (all three).

    Encoding prompts as the model reads them:"""

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 77, d] text embeddings (the UNet's `context`), on the compute device."""

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of the prompt *including* BOS, EOS and padding up to 77."""

    # Optional: ``encode_with_pooled(prompts) -> (context [B, 77, d], pooled [B, p] or None)``, the
    # pooled text embedding a vector-conditioned UNet (SDXL) needs; see `conditioning`.

    # The encoders' own layers, on token ids (EMCID's stages, the red team's hooks).
    # ComfyUI clip names in order: ("clip_l",), ("clip_l", "clip_g"), ("clip_l", "t5xxl") (Flux),
    # ("clip_l", "clip_g", "t5xxl") (SD3)
    encoders: tuple[str, ...]
    kinds: Mapping[str, str]    # encoder -> "clip" (BOS first, ``mlp.fc2``), "t5" (no BOS, ``DenseReluDense.wo``) or "llm"
    device: torch.device

    def modules(self, encoder: str) -> Mapping[str, torch.nn.Module]:
        """``named_modules()`` of that encoder's text transformer (``text_model.encoder.layers.3.mlp.fc2``,
        ``encoder.block.3.layer.1.DenseReluDense.wo``)."""

    def tokenize(self, prompts: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Token ids [B, L] per encoder (on the device; CLIP L = 77, Flux's T5 256, SD3's T5 at
        least 77) and, per encoder, the number n of real tokens of each prompt (without BOS/EOS):
        the last real token sits at index n on CLIP (after BOS), n − 1 on T5."""

    def forward(self, encoder: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one encoder as the host does for the UNet: (its part of the context [B, 77, d], pooled).
        Under `EmcidConfig.official` stage 1 also passes ``masked=True`` (the padding after EOS masked
        as keys, as HF's CLIPTextModel runs a tokenizer's batch) and ``projected=`` (whether the pooled
        output is the projected one), on CLIP encoders."""

    def combine(self, outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's context and pooled vector from every encoder's `forward` output, as the host
        builds them (SD: the encoders' states concatenated, the last one's pooled; Flux: T5's states,
        CLIP-L's pooled; SD3: CLIP-L ‖ G padded to T5's width, then T5's states along the tokens,
        pooled L ‖ G)."""

    def context(self, ids: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`combine` of every encoder's `forward`; differentiable when grad is enabled."""

    # Optional, for encoders whose prompt sits inside a chat template or which the model reads at a hidden
    # layer (kind "llm": ``model.layers.{i}.mlp.down_proj``); CLIP's and T5's rules apply where absent:
    #   first_token(encoder) -> int: index of a prompt's first own token (CLIP 1, T5 0);
    #   caption_rows(encoder, ids) -> [B, L] bool or None: the rows C₀ averages over (None: `caption_mask`);
    #   caption_tag(encoder) -> str: what besides the weights decides C₀ (its cache name);
    #   read_layer(encoder) -> int or None: the last layer whose output the model reads (`edit_layers`);
    #   emcid_refusal() -> str or None: why EMCID's closed form does not hold on these encoders.

    # Soft prompts (the red team's attacks):
    placeholder: str  # a word that is one token in every encoder's tokenizer

    def encode_soft(self, prompts: Sequence[str], soft: Sequence[torch.Tensor] | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, 77, d], pooled or None) with the placeholders' embeddings replaced by `soft`
        (one [k, d_e] tensor per encoder; every prompt holds exactly k placeholders)."""

    def vocabulary(self) -> list[torch.Tensor]:
        """Each encoder's token embedding matrix [V, d_e] (for initialisation and projection)."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """The words of token ids (a projected prompt)."""


class Denoiser(Protocol):
    """Runs the diffusion model."""

    def modules(self) -> Mapping[str, torch.nn.Module]:
        """``named_modules()`` of the UNet that actually runs (LDM names, no prefix)."""

    def sample(self, prompts: Sequence[str], *, steps: int, cfg: float, seed: int,
               negative: str = "", on_step: Callable[[int], None] | None = None,
               noise_per_prompt: bool = False) -> torch.Tensor:
        """Full denoising of each prompt; ``on_step(i)`` is called before the model runs for step i
        (i = 0 is the noisiest step). Returns the final latents [B, C, H, W].

        The starting noise comes from `seed`: by default one draw for the whole batch (each prompt
        its own noise, which depends on its slot); with ``noise_per_prompt`` every prompt gets the
        noise a batch of one would get, so a prompt's result does not depend on the batching."""


class Trainable(Protocol):
    """What training-based methods need on top of `Denoiser` (ComfyDenoiser provides it)."""

    latent_channels: int            # the model's latent channels (4 on SD, 16 on SD3 and Flux)
    latent_size: tuple[int, int]    # (h, w) of the latents it draws and trains at

    def unet(self) -> torch.nn.Module:
        """The UNet module (LDM names) as it runs, weights patched."""

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T−1."""

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The model's ε-prediction at x_t = √ᾱ x₀ + √(1−ᾱ) ε, integer t, text context [B, 77, d],
        whatever the model's own prediction type (a v-model's output is converted by the host);
        differentiable w.r.t. x, context, y and hooked adapters. `y` = the vector conditioning
        (SDXL's pooled text + size embedding, from `adm`; None for SD1.x/SD2.x). The one way the
        library calls the denoiser directly: every objective here is written in ε."""

    def adm(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The `y` this model needs for a pooled text embedding (differentiable in `pooled`), or None
        when the model takes none. Optional: hosts without it are treated as needing none."""

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-timestep weights [B] that make an ε-MSE at `t` the model's own training loss (the
        velocity MSE of a rectified-flow model), or None for the ε-MSE itself. Optional: hosts
        without it train on the ε-MSE (`diffusion.objective_mse`)."""


class Host(Protocol):
    """One model and its text encoders as a method's ``compute(host, config)`` sees them: what it reads
    (layout, unpatched weights, fingerprint), how it runs them (text, denoiser, training), and the
    progress/Cancel context. ComfyUI's is `comfy_host.view.ModelView`, built once per node call; the
    host applies the returned `Edit` itself, so no method writes to a model."""

    family: Family                  # the layout read from the model (`editing.arch`)
    ctx: RunContext                 # progress, Cancel, device; `items` for per-concept progress
    latent: tuple[int, int] | None  # the picture size asked for, in 8-pixel cells; None: the model's own

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """The denoiser's unpatched weights by the host's key (float; quantized ones dequantized)."""

    @property
    def text_weights(self) -> Mapping[str, torch.Tensor]:
        """The text encoders' unpatched weights by the host's key."""

    @property
    def text_norms(self) -> Mapping[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Norm module name -> the model's own norm as a function, for each norm a DiT applies in front
        of a text projection (the rows a closed form solves on)."""

    @property
    def fingerprint(self) -> dict:
        """What identifies the model an edit is made for (`editing.arch.fingerprint`)."""

    @property
    def text(self) -> Text:
        """The text encoders as the model reads them (encoding prompts), checked against its width."""

    @property
    def denoiser(self) -> Denoiser:
        """The model as `Denoiser` + `Trainable`, at this host's picture size."""

    def text_layers(self) -> Text:
        """The text encoders' own layers on token ids (EMCID, the red team's hooks), refused where the
        host cannot run them exactly (`check_text_path`)."""

    def training(self, *, model: bool = False, text: bool = False) -> AbstractContextManager:
        """Where gradients flow: the denoiser (`model`) and/or the text encoders (`text`) loaded and their
        weights usable by autograd for the duration, every parameter frozen; adapters train on top."""

    def sampler(self, edit: Edit | None = None) -> Denoiser:
        """A quiet `Denoiser` (no progress of its own) of this model with `edit` applied (None: as it
        is), that encodes each distinct prompt once: a loop that samples the same prompts with
        candidate edits round after round (UCE's debias)."""

    def picture_judge(self, judge: Any, vae: Any, template: str) -> Callable:
        """``judge(latents, options, concept) -> scores [N, K]`` from an image model the host knows
        (ComfyUI: a CLIP_VISION, its pictures decoded by `vae`, each option as `template`)."""

    def other(self, model: Any = None, *, latent: tuple[int, int] | None = None) -> "Host":
        """The host of another model (`model`, None: this one) read through the same text encoders and
        context, at `latent` (None: this host's size)."""

    def cells8(self) -> tuple[int, int]:
        """The picture size this host works at, in 8-pixel cells (`latent`, else the model's native size)."""

    def difference(self, base: "Host") -> Edit | None:
        """This model's weights minus `base`'s as an `Edit`, when this model is `base`'s network with
        weight patches (a pruned clone); None when it is a network of its own."""

    def check_text_path(self, what: str) -> None:
        """Refuse, saying what to use instead, a method that runs the text encoders' own layers on a
        model whose text those hooks cannot reach exactly."""

    def check_clip(self) -> None:
        """Refuse text encoders whose output this model cannot read."""

    def alternatives(self) -> str:
        """The methods that edit this model without running its text encoder, for a refusal's advice."""


def latent_size(width: int = 0, height: int = 0) -> tuple[int, int] | None:
    """Pixels (a job's width/height, 0 = the model's native size) -> latent (height, width) in 8-pixel cells."""
    if not width and not height:
        return None
    if min(width, height) < 8:
        raise InvalidInputError(f"give both width and height of at least 8 pixels (or 0 for the model's native size), "
                                f"got {width}×{height}")
    return height // 8, width // 8


@dataclass(kw_only=True)
class Job:
    """What every method's job config takes besides the method's own settings: how much of the edit the
    host applies (`strength`), and the picture size the methods that generate work at (0 = the model's
    native size). Each method package's ``config.py`` defines its job as a subclass."""
    strength: float = 1.0
    width: int = 0
    height: int = 0

    def latent(self) -> tuple[int, int] | None:
        return latent_size(self.width, self.height)


def base_weights(host) -> Mapping[str, torch.Tensor] | None:
    """The host's unpatched weights by ComfyUI key (``Trainable.base_weights()``, optional), the W that
    mask edits are resolved against; None when the host does not say (its modules' weights are then
    taken as they are)."""
    get = getattr(host, "base_weights", None)
    return get() if get is not None else None


def latent_shape(host) -> tuple[int, ...]:
    """(C, H, W) of the latents this host draws from noise: its `latent_channels` (4 when it does
    not say) and `latent_size` (h, w), else a square of `latent_hw` (32 when it says neither); (C, 1,
    H, W), one frame, for a model whose latents are video-shaped (`latent_dims` 3: Wan, Qwen-Image)."""
    h, w = getattr(host, "latent_size", None) or (getattr(host, "latent_hw", 32),) * 2
    c = int(getattr(host, "latent_channels", 4))
    return (c, 1, int(h), int(w)) if getattr(host, "latent_dims", 2) == 3 else (c, int(h), int(w))


def frames(x: torch.Tensor) -> torch.Tensor:
    """Latents or pictures as a batch of single pictures: video-shaped [B, C, T, H, W] (Wan, Qwen-Image,
    one frame drawn) -> [B·T, C, H, W]; 4-D ones as they are."""
    return x.movedim(2, 1).flatten(0, 1) if x.ndim == 5 else x


def conditioning(host, text: Text, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the UNet is conditioned on for `prompts`: (context [B, 77, d], y [B, adm] or None).

    y = ``host.adm(pooled, B)`` of the text encoder's pooled output (`encode_with_pooled`) for a
    vector-conditioned model (SDXL), None for the others; a host without `adm` takes none. The
    training, audit and distillation paths all encode their prompts through here, so y travels with
    the context wherever the denoiser is called."""
    prompts = list(prompts)
    with_pooled = getattr(text, "encode_with_pooled", None)
    if with_pooled is not None:
        context, pooled = with_pooled(prompts)
    else:
        context, pooled = text.encode(prompts), None
    adm = getattr(host, "adm", None)
    y = adm(pooled, len(prompts)) if adm is not None else None
    return context, y


def cat_y(*ys: torch.Tensor | None) -> torch.Tensor | None:
    """`torch.cat` of vector conditionings that are all tensors, or None when the model takes none."""
    if any(y is None for y in ys):
        if not all(y is None for y in ys):
            raise ValueError("either every part of a batch has its vector conditioning y or none has")
        return None
    return torch.cat(ys)


def rows_y(y: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """y of one prompt (the empty prompt, say) repeated for a batch of n."""
    return None if y is None else y.expand(n, *y.shape[1:])


@dataclass
class RunContext:
    """Progress and Cancel, passed in by the host. Both are optional."""

    progress: Callable[[int, int], None] | None = None  # (done, total)
    should_stop: Callable[[], bool] | None = None
    device: torch.device | None = None
    # Data-parallel training (one process per GPU, e.g. under torchrun): `average` turns
    # this process's gradients into the mean over all processes (in place or returned); `rank`
    # gives each process its own batches. None / 0 = a single process.
    average: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
    rank: int = 0
    # (done, total) of a job's own units (EMCID's concepts), reported before the progress they belong
    # to: a host's progress text names them ("12/1000 concepts")
    items: Callable[[int, int], None] | None = None

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)
        self.check()

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("cancelled by the user; nothing was applied")


class PhaseRate:
    """The rate of a job's current phase, for a time-left estimate. A report with a new total starts a
    new phase (EMCID: stage 1's concepts, then C₀, then stage 2), and what was done when a phase began
    (work taken from a cache) does not count toward its rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.total: int | None = None
        self.t0 = 0.0
        self.start = 0

    def update(self, done: int, total: int) -> float:
        """Record a report; the seconds since its phase began."""
        now = self.clock()
        if total != self.total:
            self.total, self.t0, self.start = total, now, done
        return now - self.t0

    def seconds_left(self, done: int, total: int) -> float | None:
        """Record a report; the time left at the phase's rate, None while there is no rate or when done."""
        elapsed = self.update(done, total)
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        return (total - done) / rate if rate > 0 and done < total else None


def time_left_text(seconds: float) -> str:
    """'35 s', '3 min', '1.2 h'."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"

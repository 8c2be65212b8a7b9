"""EMCID's configuration: the two stages' settings (`EmcidConfig`; None = the family's value) and the
job `compute` takes (`EmcidJob`: the source -> destination pairs, the settings, the cache)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from ..errors import InvalidInputError
from ..hosts import Job


DEFAULT_TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "a painting of {}")
RESIDUALS = ("official", "memit")
LAM_MODES = ("relative", "absolute")
# `official`: "off" is the pack's own procedure; "emcid" follows the official EMCID code for SD1.4 and
# SDXL step by step (`official.OFFICIAL_SOURCE` names the files and commit, `official.settings` what it sets)
OFFICIAL = ("off", "emcid")


def absolute_lam(lam: float, mode: str, width: int) -> float:
    """The λ a layer's solve uses: `lam` itself ("absolute", the paper's units) or `lam` per dimension
    of the layer's keys ("relative": λ = lam · m, m the fc2 input width).

    Why the width: for one key k the update writes the share q / (λ + q) of what is asked of the
    layer, q = kᵀ C₀⁻¹ k, and over the captions' own keys E[q] = tr(C₀⁻¹ C₀) = m. C₀ and KᵀK scale
    together with the keys' norms, so those cancel; the width does not, and an absolute λ tuned
    at CLIP-L's m = 3072 holds a 256-wide layer about twelve times as firmly."""
    if mode not in LAM_MODES:
        raise InvalidInputError(f"lam_mode must be one of {', '.join(LAM_MODES)}, got {mode!r}")
    return float(lam) * width if mode == "relative" else float(lam)


@dataclass
class EmcidConfig:
    """EMCID parameters. None = the model family's value (`presets.FAMILY_DEFAULTS`, the official
    code's hyper-parameters), filled in by `resolve_defaults` when the edit is computed."""

    # λ: weight of the preserved statistics C₀; one value for every text encoder, or per encoder
    # name ({"clip_l": 4000, "clip_g": 10000}; encoders it leaves out get the family's)
    lam: float | Mapping[str, float] | None = None
    # how `lam` counts (`absolute_lam`): "relative" = per dimension of each layer's keys, so one value
    # means the same on every width (the family defaults: SD's 4000 at CLIP-L's 3072 is 1.302);
    # "absolute" = the paper's λ as written. None: absolute when `lam` is given (a number written as
    # the paper's λ keeps its meaning), relative for the family's default
    lam_mode: str | None = None
    use_stage1: bool = True             # False: target z = the destination's own hidden state (no UNet needed)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # prompts the concept appears in; "{}" is the concept
    layers: dict[str, tuple[int, ...]] | None = None  # encoder -> fc2 layers; None = the family's table
    # stage 2's residual at layer l_i: "official" = Z − (that layer's fc2 output), as EMCID's code
    # computes it; "memit" = Z − (the last edit layer's output), MEMIT's; one for every encoder or
    # per encoder name; None = the family's (memit on T5: Flux's and SD3's)
    residual: str | Mapping[str, str] | None = None
    # stage 1
    steps: int | None = None            # Adam steps per concept (official: SD 200, SDXL 100)
    lr: float | None = None             # official: SD 0.2, SDXL 0.1
    weight_decay: float | None = None   # wd in wd·‖δ‖/‖h‖² (official: SD 5e-4, SDXL 8e-3)
    pooled_weight: float | None = None  # weight of each encoder's pooled-output MSE (official: SD 0.01, SDXL 0.005)
    max_norm: float | None = None       # ‖δ‖ ≤ max_norm·‖h‖ (official: SD 1.5, SDXL 1.2)
    images_per_prompt: int = 1          # source images per template for x_t
    sample_steps: int = 20
    sample_cfg: float = 5.0
    seed: int = 0
    # C₀
    n_captions: int = 2000              # generic captions for C₀ (≈ 10 tokens each)
    caption_seed: int = 0
    batch: int = 64                     # prompts per text-encoder forward (bounds memory)
    # stage-1 concepts optimised together (one denoiser batch carries all their rows); 0 = chosen from
    # free memory (`stage1.stage1_batch_size`), 1 = one at a time. The targets do not depend on it
    # (up to float rounding), so it is neither an edit parameter nor part of the cache key
    stage1_batch: int = 0
    # follow the official EMCID code instead of the pack's choices (`OFFICIAL`; `official.settings`):
    # its hyper-parameters, λ absolute, its C₀ (100k captions, float32) and its stage-1 text path
    official: str = "off"

    def validate(self) -> None:
        lams = self.lam.values() if isinstance(self.lam, Mapping) else [] if self.lam is None else [self.lam]
        if any(not (float(v) > 0) for v in lams):
            raise InvalidInputError(f"λ must be > 0 (official: 4000-10000 absolute, 1.3-2 relative), got {self.lam}; "
                                    "leave it unset for the model family's default")
        if self.lam_mode is not None and self.lam_mode not in LAM_MODES:
            raise InvalidInputError(f"lam_mode must be one of {', '.join(LAM_MODES)}, got {self.lam_mode!r}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise InvalidInputError("every template needs exactly one '{}' where the concept goes, e.g. 'a photo of {}'")
        residuals = (self.residual.values() if isinstance(self.residual, Mapping)
                     else [] if self.residual is None else [self.residual])
        if any(r not in RESIDUALS for r in residuals):
            raise InvalidInputError(f"residual must be one of {', '.join(RESIDUALS)}, got {self.residual!r}")
        if ((self.steps is not None and self.steps < 1) or (self.lr is not None and self.lr <= 0)
                or (self.max_norm is not None and self.max_norm <= 0)
                or (self.weight_decay is not None and self.weight_decay < 0)
                or (self.pooled_weight is not None and self.pooled_weight < 0)):
            raise InvalidInputError("stage 1 needs steps ≥ 1, lr > 0, max_norm > 0, weight_decay ≥ 0 and "
                                    "pooled_weight ≥ 0 (or None for the model family's default)")
        if self.images_per_prompt < 1 or self.sample_steps < 1:
            raise InvalidInputError("images_per_prompt and sample_steps must be ≥ 1")
        if self.n_captions < 10 or self.batch < 1:
            raise InvalidInputError("n_captions must be ≥ 10 and batch ≥ 1")
        if self.stage1_batch < 0:
            raise InvalidInputError("stage1_batch must be ≥ 0 (0: chosen from free memory, 1: one concept at a time)")
        if self.official not in OFFICIAL:
            raise InvalidInputError(f"unknown official {self.official!r}; choose one of {', '.join(OFFICIAL)} "
                                    "(off: the pack's defaults; emcid: the official EMCID code's procedure)")

    @property
    def runs_stage1(self) -> bool:
        """Whether stage 1 runs (and needs the diffusion model): the official procedure always runs it."""
        return self.use_stage1 or self.official != "off"

    def lam_for(self, encoder: str, width: int | None = None) -> float:
        """λ of one text encoder (after `resolve_defaults`) as the solve uses it on keys `width` wide.
        Without a width only an absolute λ can be given: a relative one is refused, never returned
        as if it were absolute."""
        lam = self.lam_value(encoder)
        mode = self.lam_mode or "absolute"
        if width is None:
            if mode == "relative":
                raise InvalidInputError(f"the {encoder} λ is relative ({lam:g} per key dimension): "
                                        "give the key width, or read it with `lam_value`")
            return lam
        return absolute_lam(lam, mode, width)

    def lam_value(self, encoder: str) -> float:
        """`lam` of one text encoder as configured, in `lam_mode`'s units."""
        lam = self.lam.get(encoder) if isinstance(self.lam, Mapping) else self.lam
        if lam is None:
            raise InvalidInputError(f"no λ for the {encoder} text encoder; give one per encoder or a single value")
        return float(lam)

    def residual_for(self, encoder: str) -> str:
        """Stage 2's residual on one text encoder (after `resolve_defaults`)."""
        r = self.residual.get(encoder) if isinstance(self.residual, Mapping) else self.residual
        return r or "official"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("stage1_batch")  # how the work is scheduled, not what the edit is
        d["templates"] = list(self.templates)
        if isinstance(self.lam, Mapping):
            d["lam"] = {k: float(v) for k, v in self.lam.items()}
        if isinstance(self.residual, Mapping):
            d["residual"] = dict(self.residual)
        return d


@dataclass(kw_only=True)
class EmcidJob(Job):
    """What EMCID edits: each (source, destination) pair's source is read as its destination."""
    pairs: Sequence[tuple[str, str]]
    settings: EmcidConfig = field(default_factory=EmcidConfig)
    cache_dir: str | None = None  # C₀ and stage-1 targets between runs

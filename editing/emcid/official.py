"""EMCID's `official` setting: the official code's procedure (github:SilentView/EMCID) for the inputs
its scripts take (concept pairs, prompts, λ, layers, hyper-parameters), in place of the pack's choices.

What "emcid" switches (each point follows the files named in `OFFICIAL_SOURCE`):

- hyper-parameters: the official tables (`presets.SD` for one CLIP encoder, the SD1.4 json and the
  λ 4000 its scripts pass; `presets.SDXL` for CLIP-L + bigG), also on the tiny model and SD2, which
  the official code has no settings for; what the user sets stays theirs;
- λ is absolute, the paper's number (4000; SDXL 4000 / 10000), a λ the user gives counts as written;
- stage 2 subtracts each layer's own fc2 output (the "official" residual) on every encoder;
- C₀: 100,000 captions (`mom2_n_samples`), k kᵀ summed in float32 (`mom2_dtype`), each caption's BOS,
  tokens and EOS (its attention mask), from the unedited encoder (the cached statistics its
  precompute script writes);
- stage 1 always runs; the pictures are drawn with 50 steps at CFG 7.5 (diffusers' pipeline call);
  each step takes one picture per prompt (`samples_per_prompt`); the prompts are padded to the
  longest of their batch (`tokenize_prompts`, padding=True) and encoded with that padding masked, so
  the UNet reads that many context rows, not 77; the pooled term reads HF's `pooler_output` (the
  unprojected EOS state) on SD and CLIP-L, bigG's `text_embeds` (projected) on SDXL, and on SDXL the
  destination's bigG ids are CLIP-L's (the official code tokenizes it with the first tokenizer);
- h (the clean state δ is added to, whose norm bounds δ and scales its weight decay, and which
  z = h + δ starts from) is the first prompt's, not the mean over the prompts.

What the pack cannot give is in the docs: the ccs_filtered caption set, diffusers' PNDM/Euler
samplers and the VAE round trip of the training pictures.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING

from ..arch import Family
from ..errors import InvalidInputError
from .presets import SD, SDXL, FamilyDefaults

if TYPE_CHECKING:
    from .config import EmcidConfig

OFFICIAL_SOURCE = ("github:SilentView/EMCID at commit 10a392afb502cc2ed6a781c7c56dc179defaf064: "
                   "emcid/emcid_main.py (execute_emcid_text_encoder, execute_emcid_sd_xl_text_encoders), "
                   "emcid/compute_z.py (compute_z_text_encoder, compute_z_sdxl_text_encoders, "
                   "get_module_input_output_at_words), emcid/layer_stats.py (layer_stats_text_encoder), "
                   "emcid/emcid_hparams.py, hparams/dest_s-200_c-1.5_ly-11_lr-0.2_wd-5e-04_txt-align-0.01.json, "
                   "hparams/sdxl-dest_s-100_c-1.2_ly-8-11_ly2-26-31_lr-0.1_wd-8e-03_txt-align-0.01.json, "
                   "sh_scripts/*.sh (MOM2=4000)")

SAMPLE_STEPS = 50          # diffusers' StableDiffusionPipeline default num_inference_steps
SAMPLE_CFG = 7.5           # the guidance_scale compute_z passes
N_CAPTIONS = 100_000       # mom2_n_samples
EDIT_WEIGHT = 0.5          # edit_weight α: C₀·(1−α)/0.5, keys and residuals ·√(α/0.5); 0.5 leaves all as they are

_SDXL_ENCODERS = ("clip_l", "clip_g")


def official_table(encoders: Sequence[str]) -> tuple[str, FamilyDefaults]:
    """The official code's settings for these text encoders: SDXL's for CLIP-L + bigG, else SD1.4's."""
    return ("sdxl", SDXL) if tuple(encoders) == _SDXL_ENCODERS else ("sd1", SD)


def check_supported(family: Family, text) -> None:
    """The official code edits the CLIP text encoder(s) of a UNet model (SD1.4, SDXL); refuse the rest."""
    kinds = getattr(text, "kinds", {})
    others = [e for e in text.encoders if kinds.get(e, "clip") != "clip"]
    if family.kind != "unet" or others or len(text.encoders) > 2:
        what = f"its {', '.join(others)} encoder" if others else f"this {family.label}"
        raise InvalidInputError(f"official 'emcid' follows the official EMCID code, which edits the CLIP text encoders "
                                f"of SD1.4 and SDXL; {what} has no official procedure: set official to off")


def settings(cfg: EmcidConfig, family: Family, text) -> tuple[EmcidConfig, dict, list[str]]:
    """(the config the official procedure runs with, the `family_defaults` record, warnings naming each
    pack-only setting the user changed that it ignores) for `cfg` with `official` set."""
    from .stage2 import resolve_defaults
    from .config import EmcidConfig
    check_supported(family, text)
    key, table = official_table(text.encoders)
    defaults = {f.name: f.default for f in fields(EmcidConfig)}
    warnings = []
    if family.name not in ("sd1", "sdxl"):
        warnings.append(f"official emcid: the official code has settings for SD1.4 and SDXL only; "
                        f"{'SDXL' if key == 'sdxl' else 'SD1.4'}'s are used on this {family.label}")

    def ignored(name: str, value, why: str) -> None:
        warnings.append(f"official emcid ignores {name}={value!r}: {why}")

    if not cfg.use_stage1:
        ignored("use_stage1", False, "the official code always optimises the targets through the diffusion model")
    residuals = cfg.residual.values() if isinstance(cfg.residual, Mapping) else [cfg.residual]
    if any(r not in (None, "official") for r in residuals):
        ignored("residual", cfg.residual, "the official code subtracts each layer's own fc2 output")
    if cfg.lam is not None and cfg.lam_mode == "relative":
        ignored("lam_mode", "relative", f"λ is the paper's absolute number ({cfg.lam} is used as written)")
    for name, value, why in (("sample_steps", SAMPLE_STEPS, "the official pictures take diffusers' 50 steps"),
                             ("sample_cfg", SAMPLE_CFG, "the official pictures are drawn at CFG 7.5"),
                             ("n_captions", N_CAPTIONS, "the official C0 reads 100,000 captions")):
        if getattr(cfg, name) not in (defaults[name], value):
            ignored(name, getattr(cfg, name), why)
    cfg = replace(cfg, use_stage1=True, residual="official", lam_mode="absolute", sample_steps=SAMPLE_STEPS,
                  sample_cfg=SAMPLE_CFG, n_captions=N_CAPTIONS)
    cfg, used = resolve_defaults(cfg, family.name, text.encoders, family.kind, table=(key, table))
    used["official"] = cfg.official
    return cfg, used, warnings


def pooled_projected(encoders: Sequence[str]) -> dict[str, bool]:
    """Which pooled output the official pooled term reads per encoder: HF's `pooler_output` (the EOS
    state, unprojected) of SD's CLIP and SDXL's CLIP-L, `text_embeds` (projected) of SDXL's bigG."""
    sdxl = tuple(encoders) == _SDXL_ENCODERS
    return {e: sdxl and e == "clip_g" for e in encoders}


def destination_ids_from(encoders: Sequence[str]) -> dict[str, str]:
    """Whose token ids each encoder reads the destination prompts with: on SDXL the official code feeds
    bigG the first tokenizer's ids (`text_encoder_2(**dest_prompts_inp)`), elsewhere its own."""
    if tuple(encoders) == _SDXL_ENCODERS:
        return {"clip_l": "clip_l", "clip_g": "clip_l"}
    return {e: e for e in encoders}

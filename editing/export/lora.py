"""Any Edit -> a LoRA file that stock ComfyUI, Automatic1111/Forge and diffusers load.

Per changed weight (ComfyUI key -> the file's module name(s), see "Names" below):
- ``lowrank`` (UCE, EMCID): written exactly, ``lora_up.weight`` = up · c and ``lora_down.weight`` =
  down · c with c = √(rank / alpha) and one ``alpha`` for the whole file (its largest rank), so the
  loader's up · down · alpha / rank is up @ down (c = 1 when all ranks are equal). A rank cap
  truncates it by SVD.
- ``delta`` (dense ΔW): truncated SVD, the smallest rank whose relative Frobenius error is at most
  `max_rel_error` (or a fixed `rank`); the error is reported per key. Or ``dense_as="diff"``: the
  full delta as ``.diff`` (exact, big).
- ``mask`` (ConceptPrune): always ``.diff``. ΔW = −W ⊙ M depends on the base weights, so the
  export needs them (`base`), and a pruning mask is sparse and full-rank, which SVD cannot
  compress. Such a file is tied to that checkpoint: on another checkpoint it subtracts the wrong
  values.
``.diff`` modules are read by ComfyUI's LoraLoader and by A1111's built-in Lora; diffusers' loaders
refuse a file that holds any (ValueError "keys have not been correctly renamed" / "Make sure all
LoRA param names contain 'lora'"), so for diffusers keep ``dense_as="svd"`` and apply masks with
`editing.export.diffusers.apply_to_diffusers` (tests/test_diffusers_lora.py checks both).

Names. UNet modules of SD1/SD2/SDXL transformer blocks are named diffusers-style
(``lora_unet_down_blocks_0_attentions_0_…``), which all three hosts read. Other UNets (the tiny
model, custom layouts), ``unet_names="ldm"`` and files with any UNet weight outside the transformer
blocks (parameter set ``noxattn``) get the LDM names (``lora_unet_input_blocks_1_1_…``) for every
UNet module: ComfyUI and A1111 read them, diffusers' SDXL loader maps them by the UNet's config,
its SD1/SD2 loader refuses them (NoMatchingPeftModuleError).
A DiT's modules are named as its variant says (`editing.arch.dit.Variant.lora_names`): names that
ComfyUI's LoraLoader and the diffusers loader of that model's pipeline both read, in the PEFT form
(``<name>.lora_A.weight`` / ``lora_B.weight``, no alpha: both scale by 1, so B @ A is the change):
- ``transformer.<diffusers name>`` (Chroma, Qwen-Image, HiDream, PixArt, AuraFlow): a Linear that
  ComfyUI fuses and diffusers splits (``img_attn.qkv`` -> ``attn.to_q/to_k/to_v``) becomes one module
  per part, the down factor shared and the up factor's rows split, which ComfyUI maps back onto
  row slices of the fused weight. A file with a layer whose diffusers name is not known falls back to
  ComfyUI's names below;
- ``diffusion_model.<ComfyUI name>`` (Flux.2, Wan, Lumina 2, HunyuanImage), which ComfyUI reads for
  every model and diffusers' Flux.2 / Wan / Lumina 2 loaders convert (Wan's only when the file holds
  a block's layer, Lumina 2's only for every Linear of every block at its real widths; HunyuanImage's
  pipeline has no loader);
- ``diffusion_model.<diffusers name>`` (Z-Image: ComfyUI's Lumina map and diffusers' Z-Image loader);
- Flux.1 and SD3: ``transformer.<diffusers name>`` when no module of the file is fused, else every
  module kohya-style in the original names (``lora_unet_double_blocks_0_img_attn_qkv``), which ComfyUI
  and diffusers' kohya-Flux reader take.
``unet_names="diffusers"`` writes every DiT module as ``transformer.<diffusers name>`` (what diffusers'
loaders read for every model they take, and its `load_lora_adapter` on HunyuanImage's transformer;
ComfyUI reads these only for Flux.1, Chroma, SD3, Qwen-Image, HiDream, PixArt and AuraFlow);
``"ldm"`` writes kohya ``lora_unet_<ComfyUI name>`` with alphas, which ComfyUI and A1111 read.
tests/test_diffusers_families.py loads each family's file into diffusers and into ComfyUI.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch

from ..arch import UNET_PREFIX, Family
from ..arch.dit import split_rows
from ..edit import Change, Edit
from ..errors import InvalidInputError
from ..hosts import RunContext

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ARCH_TAG = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
             "sdxl": "stable-diffusion-xl-v1-base", "tiny": "conceptedit-tiny", "flux1": "flux-1-dev",
             "sd3-medium": "stable-diffusion-v3-medium", "sd3.5-large": "stable-diffusion-v3.5-large",
             "tiny-flux": "conceptedit-tiny-flux",
             "tiny-qwen-image": "conceptedit-tiny-qwen-image"}


@dataclass
class LoraExportConfig:
    rank: int = 0                 # cap on the rank per module; 0 = exact low-rank / error-driven SVD
    max_rel_error: float = 0.01   # dense deltas: largest relative Frobenius error allowed by SVD
    dense_as: str = "svd"         # "svd" (lora_up/down) | "diff" (full delta)
    # "auto" | "diffusers" | "ldm": UNets' kohya names in diffusers' or LDM's style; a DiT's modules in
    # the names its ComfyUI and diffusers both read ("auto"), diffusers' own ("diffusers") or kohya's
    # lora_unet_<ComfyUI name> ("ldm"); see the module's docstring
    unet_names: str = "auto"
    dtype: str = "float16"

    def validate(self) -> None:
        if self.rank < 0:
            raise InvalidInputError(f"rank must be ≥ 0 (0 = automatic), got {self.rank}")
        if not (0 <= self.max_rel_error < 1) or not math.isfinite(self.max_rel_error):
            raise InvalidInputError(f"max_rel_error must be in [0, 1), got {self.max_rel_error}")
        if self.dense_as not in ("svd", "diff"):
            raise InvalidInputError(f"dense_as must be 'svd' or 'diff', got {self.dense_as!r}")
        if self.unet_names not in ("auto", "diffusers", "ldm"):
            raise InvalidInputError(f"unet_names must be 'auto', 'diffusers' or 'ldm', got {self.unet_names!r}")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


# Families whose diffusers-style names ComfyUI's own `unet_to_diffusers` map agrees with (checked in
# tests/test_arch.py). The tiny model has a level without res blocks, which that map gets wrong.
_DIFFUSERS_NAMED = ("sd1", "sd2", "sdxl")
# module names written in the PEFT form (lora_A / lora_B, no alpha); every other is kohya's
_PEFT_PREFIXES = ("transformer.", UNET_PREFIX)


def kohya_name(family: Family, key: str, unet_names: str = "auto") -> str:
    """The file's module name of a key that diffusers does not split (UNets, text encoders, the
    legacy Flux.1/SD3 naming); `lora_modules` names any key."""
    if family.is_mmdit and key.startswith(UNET_PREFIX) and unet_names == "peft":
        # Flux/SD3: diffusers' transformer names in the PEFT form (``transformer.context_embedder``),
        # which diffusers' Flux/SD3 loaders and ComfyUI's LoraLoader (its flux/mmdit_to_diffusers map) read
        return family.to_diffusers(key).rsplit(".weight", 1)[0]
    if unet_names == "auto":
        unet_names = "diffusers" if family.name in _DIFFUSERS_NAMED else "ldm"
    if key.startswith(UNET_PREFIX) and unet_names == "diffusers" and not family.is_mmdit:
        try:
            return family.to_kohya_diffusers_style(key)
        except KeyError:  # a UNet weight outside the transformer-block table: LDM name
            pass
    return family.to_kohya(key)


# DiT namings (`Variant.lora_names`): the prefix of a module's name, and whether it is diffusers' name
_DIT_NAMINGS = {"transformer": ("transformer.", True), "diffusion_model": (UNET_PREFIX, False),
                "diffusion_model+diffusers": (UNET_PREFIX, True)}


def lora_modules(family: Family, key: str, shape: tuple[int, ...], naming: str) -> list[tuple[str, int, int]]:
    """(module name in the file, first row, rows) for one key under the file's `naming`
    (`file_unet_names`): one module, or one per diffusers part of a Linear diffusers splits.
    KeyError when the naming needs a diffusers name this layout does not know."""
    rows = int(shape[0])
    if family.is_mmdit and key.startswith(UNET_PREFIX) and naming in _DIT_NAMINGS:
        prefix, diffusers_names = _DIT_NAMINGS[naming]
        module = key[len(UNET_PREFIX):].rsplit(".weight", 1)[0]
        if not diffusers_names:
            return [(prefix + module, 0, rows)]
        parts = family.adapter.diffusers_modules(module, family.variant, family.label)
        if len(parts) == 1:
            return [(prefix + parts[0].rstrip("*"), 0, rows)]
        cols = math.prod(shape[1:])
        return [(prefix + name, start, n) for name, start, n in split_rows(parts, rows, cols)]
    return [(kohya_name(family, key, naming), 0, rows)]


def file_unet_names(family: Family, keys, unet_names: str = "auto") -> str:
    """The UNet naming of a whole file: "auto" is diffusers-style only when every UNet key of the
    edit has such a name (a transformer-block weight of SD1/SD2/SDXL), else LDM-style for all of them.
    One style per file: diffusers' SDXL loader drops every LDM-named module of a file that also holds
    diffusers-named ones, without a word (its all-LDM files it maps by the UNet config).
    A DiT's: its variant's `lora_names` (falling back to ComfyUI's names, ``diffusion_model``, when a
    key has no known diffusers name), "transformer" for ``unet_names="diffusers"``."""
    if family.is_mmdit:
        return _dit_naming(family, keys, unet_names)
    if unet_names != "auto":
        return unet_names
    if family.name not in _DIFFUSERS_NAMED:
        return "ldm"
    for key in keys:
        if key.startswith(UNET_PREFIX):
            try:
                family.to_kohya_diffusers_style(key)
            except KeyError:
                return "ldm"
    return "diffusers"


def _dit_naming(family: Family, keys, unet_names: str) -> str:
    if unet_names == "ldm":
        return "ldm"
    variant = family.adapter.variant(family.variant) if family.adapter is not None else None
    naming = "transformer" if unet_names == "diffusers" else (variant.lora_names if variant is not None else "")
    unet_keys = [k for k in keys if k.startswith(UNET_PREFIX)]
    if naming == "":
        # Flux.1 / SD3: PEFT names where every UNet key has one diffusers name; else (a fused qkv or
        # linear1 of a trained edit, which diffusers splits into to_q/k/v) the original names,
        # kohya-style (``lora_unet_double_blocks_0_img_attn_qkv``), which ComfyUI and diffusers' kohya-Flux reader take
        try:
            for key in unet_keys:
                family.to_diffusers(key)
        except KeyError:
            return "ldm"
        return "peft"
    if _DIT_NAMINGS[naming][1]:
        for key in unet_keys:
            module = key[len(UNET_PREFIX):].rsplit(".weight", 1)[0]
            try:
                family.adapter.diffusers_modules(module, family.variant, family.label)
            except KeyError:
                if unet_names == "diffusers":
                    raise InvalidInputError(f"{key} has no diffusers name in ConceptEdit's {family.label} table: "
                                            "export with unet_names 'auto' (names ComfyUI reads)") from None
                return "diffusion_model"
    return naming


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, max_err: float
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """up = U_r √S_r, down = √S_r V_rᵀ, and the relative Frobenius error of dropping the rest."""
    energy = S.double() ** 2
    total = float(energy.sum())
    if total == 0:
        r = 1
    elif rank > 0:
        r = min(rank, S.numel())
    else:
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[i] = Σ_{j≥i} s_j²
        ok = (tail / total) <= max_err ** 2
        ok = torch.cat([ok, torch.tensor([True], device=ok.device)])
        r = max(1, int(torch.nonzero(ok)[0]))
    err = math.sqrt(float(energy[r:].sum()) / total) if total > 0 else 0.0
    s = S[:r].sqrt()
    return U[:, :r] * s, s[:, None] * Vh[:r], err


def _factor(change: Change, cfg: LoraExportConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    if change.kind == "lowrank":
        up, down = change.tensors["up"].double(), change.tensors["down"].double()
        if cfg.rank == 0 or up.shape[1] <= cfg.rank:
            return up, down, 0.0
        # SVD of up @ down through its thin factors (never the dense out × d product)
        Qu, Ru = torch.linalg.qr(up)
        Qd, Rd = torch.linalg.qr(down.T)
        U, S, Vh = torch.linalg.svd(Ru @ Rd.T, full_matrices=False)
        a, b, err = _truncate(U, S, Vh, cfg.rank, cfg.max_rel_error)
        return Qu @ a, b @ Qd.T, err
    d = change.delta(dtype=torch.float64).reshape(change.shape[0], -1)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (*_truncate(U, S, Vh, cfg.rank, cfg.max_rel_error),)


def edit_to_lora(edit: Edit, config: LoraExportConfig | None = None,
                 base: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
                 ctx: RunContext | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(kohya state dict, report). `base` gives the base weights, needed only for mask changes."""
    cfg = config or LoraExportConfig()
    cfg.validate()
    ctx = ctx or RunContext()
    edit.check_finite()
    if not edit.changes:
        raise InvalidInputError("the edit changes no weights; there is nothing to export")
    fam = edit.layout()
    unet_names = file_unet_names(fam, edit.changes, cfg.unet_names)
    get = base.get if isinstance(base, Mapping) else base
    dtype = DTYPES[cfg.dtype]
    sd: dict[str, torch.Tensor] = {}
    per_key: dict[str, dict] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    names = set()
    for i, (key, change) in enumerate(edit.changes.items()):
        ctx.report(i, len(edit.changes))
        modules = lora_modules(fam, key, change.shape, unet_names)
        for name, _, _ in modules:
            if name in names:
                raise InvalidInputError(f"two weights map to the LoRA module {name}")
            names.add(name)
        described = {"module": modules[0][0]} if len(modules) == 1 else {"module": modules[0][0],
                                                                          "modules": [m[0] for m in modules]}
        if change.kind == "mask" or (change.kind == "delta" and cfg.dense_as == "diff"):
            w = get(key) if (get is not None and change.kind == "mask") else None
            if change.kind == "mask" and w is None:
                raise InvalidInputError(f"{key} is a pruning mask: its LoRA form (−W⊙M) needs the base weights; "
                                        "connect the MODEL (and CLIP for text-encoder masks) to Export LoRA")
            delta = change.delta(w, dtype=torch.float32).reshape(change.shape)
            for name, start, rows in modules:
                sd[f"{name}.diff"] = delta[start:start + rows].to(dtype).contiguous()
            per_key[key] = {**described, "form": "diff", "rel_error": 0.0}
            continue
        up, down, err = _factor(change, cfg)
        for name, start, rows in modules:
            # float32 until the file's alpha is known; a split module shares the down factor
            factors[name] = (up[start:start + rows].float(), down.float(), (rows, *change.shape[1:]))
        per_key[key] = {**described, "form": "lora", "rank": up.shape[1], "rel_error": err}
    ctx.report(len(edit.changes), len(edit.changes))
    ranks = [v["rank"] for v in per_key.values() if v["form"] == "lora"]
    # One alpha for the whole file (its largest rank); each module's factors carry √(rank / alpha) each,
    # so the loaders' up · down · alpha / rank is up @ down. Per-module alphas (alpha = rank) read the
    # same in ComfyUI and A1111, but diffusers (0.42) files the alphas of kohya attention modules
    # (attn*.to_q/k/v/out) under names PEFT's alpha_pattern never matches: with mixed ranks those
    # modules would load at the file's most common alpha over their own rank (2x, 0.5x, ...).
    alpha = float(max(ranks, default=1))
    for name, (up, down, shape) in factors.items():
        if name.startswith(_PEFT_PREFIXES):
            # PEFT modules carry no alpha: both loaders then scale by 1, so B @ A is the change itself
            sd[f"{name}.lora_B.weight"] = up.reshape(shape[0], -1).to(dtype).contiguous()
            sd[f"{name}.lora_A.weight"] = down.reshape(up.shape[1], *shape[1:]).to(dtype).contiguous()
            continue
        r = up.shape[1]
        c = math.sqrt(r / alpha)
        sd[f"{name}.lora_up.weight"] = (up * c).reshape(shape[0], r, *([1] * (len(shape) - 2))).to(dtype).contiguous()
        sd[f"{name}.lora_down.weight"] = (down * c).reshape(r, *shape[1:]).to(dtype).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    errs = [v["rel_error"] for v in per_key.values()]
    report = {"modules": len(per_key), "lora_modules": len(ranks), "diff_modules": len(per_key) - len(ranks),
              "max_rank": max(ranks, default=0), "max_rel_error": max(errs, default=0.0),
              "mean_rel_error": sum(errs) / max(len(errs), 1), "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
              "per_key": per_key}
    return sd, report


def lora_metadata(edit: Edit, cfg: LoraExportConfig, report: Mapping) -> dict[str, str]:
    """Header fields A1111 and the kohya tools display, plus where the file came from."""
    tag = _ARCH_TAG.get(edit.family, edit.family)
    info = {"method": edit.method, "family": edit.family, "concepts": edit.concepts, "params": edit.params,
            "fingerprint": edit.fingerprint, "metrics": edit.metrics, "export": asdict(cfg),
            "max_rel_error": report["max_rel_error"]}
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(report["max_rank"]),
            "ss_network_alpha": str(report["max_rank"]), "modelspec.architecture": f"{tag}/lora",
            "modelspec.title": f"ConceptEdit {edit.method}: {', '.join(edit.concepts)[:200]}",
            "conceptedit_source": json.dumps(info, default=str)}


def save_lora(edit: Edit, path: str | os.PathLike, config: LoraExportConfig | None = None,
              base: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
              ctx: RunContext | None = None) -> dict:
    """Write the LoRA file (atomically) and return the export report (ranks, errors, size)."""
    from safetensors.torch import save_file
    cfg = config or LoraExportConfig()
    sd, report = edit_to_lora(edit, cfg, base, ctx)
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=lora_metadata(edit, cfg, report))
    os.replace(tmp, path)
    report["path"] = path
    log.info("LoRA %s: %d modules (%d diff), max rank %d, max relative error %.2g, %.1f MB", os.path.basename(path),
             report["modules"], report["diff_modules"], report["max_rank"], report["max_rel_error"], report["bytes"] / 1e6)
    return report

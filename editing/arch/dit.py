"""DiT adapters: one per model kind, each a small table of what the methods need to know about it.

A model without SD-style cross-attention blocks is a DiT: Flux.1/Flux.2/Chroma, SD3, Qwen-Image,
Lumina 2 / Z-Image, HiDream, Wan, PixArt, HunyuanImage, AuraFlow. Each kind's module
(`flux.py`, `sd3.py`, ...) registers one `DiTAdapter` saying, by module paths of the diffusion model:
- how to recognise it (`signature`: patterns every model of the kind has; detection picks exactly
  one adapter or refuses, so no kind is taken for another);
- where the text enters (`projections`: the Linear that reads the text encoder's tokens or pooled
  vector, and any norm the model applies in front of it): the closed form's layers;
- the image-stream MLPs ConceptPrune may mask (`mlps`);
- the attention layers where image and text tokens meet (`attention`, unlearning's ESD-x set) and
  the blocks every other trainable Linear lives in (`blocks`);
- whether the model reads the pooled text vector itself (`pooled_y`), which CLIP to connect
  (`Variant.hint`), the native size, and the diffusers names where known;
- how a LoRA file names its modules so that ComfyUI's LoraLoader and diffusers' loader for that
  model both read them (`Variant.lora_names`).
Widths are never in the tables: they are read off the loaded model's shapes (`parts`).

Diffusers names may split what ComfyUI fuses: a template ``attn.to_q|attn.to_k|attn.to_v`` says
that the module's rows are those three diffusers Linears stacked. Each part has as many rows as the
module has inputs (the hidden width), except parts marked ``*``, which share the rows left equally
(Chroma's ``linear1`` = to_q | to_k | to_v | proj_mlp*, Lumina 2's grouped-query ``qkv`` =
to_q | to_k* | to_v*); `split_rows` resolves them for a shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from .core import ADAPTERS, UNET_PREFIX, DiTMLP, TextProjection


@dataclass(frozen=True)
class ProjectionRule:
    """A text projection by module path (see `TextProjection`)."""

    module: str
    source: str            # "tokens" or "pooled"
    diffusers: str = ""
    norm: str = ""


@dataclass(frozen=True)
class MLPRule:
    """MLP output Linears by a pattern over module paths (group 1 = the block's index). `fused`: the
    Linear's first `hidden` input columns are the attention output (Flux's single blocks fuse both in
    `linear2`), its MLP neurons the columns after them."""

    pattern: str
    diffusers: str = ""    # "{0}" = the block index
    fused: bool = False


@dataclass(frozen=True)
class Variant:
    """A model within a kind (Flux.1 / Flux.2 / Chroma): `marks` are module patterns only it has;
    `image_model` is ComfyUI's `unet_config["image_model"]` for it when that names it apart."""

    name: str
    label: str
    hint: str = ""                      # the CLIP to connect
    marks: tuple[str, ...] = ()
    config: tuple[tuple[str, object], ...] = ()   # unet_config entries only it has
    custom_name: str = ""               # the family name of a layout no table names ("custom" for Flux.1, SD3)
    diffusers_names: bool = True        # the adapter's diffusers names hold for this variant
    # (module pattern, diffusers template) of this variant, looked up before the adapter's names
    renames: tuple[tuple[str, str], ...] = ()
    # How its LoRA files name the diffusion model's modules, so that ComfyUI's LoraLoader and the
    # diffusers loader of its pipeline both read them (editing/export/lora.py):
    #   "transformer"       transformer.<diffusers name> (PEFT lora_A/lora_B; fused Linears split)
    #   "diffusion_model"   diffusion_model.<ComfyUI name> (PEFT lora_A/lora_B)
    #   "diffusion_model+diffusers"  diffusion_model.<diffusers name> (fused Linears split)
    #   ""                  Flux.1 / SD3: transformer.<diffusers name> when no module is fused, else
    #                       kohya lora_unet_<ComfyUI name> (which diffusers' Flux loader splits itself)
    lora_names: str = ""


@dataclass(frozen=True)
class DiTAdapter:
    kind: str
    label: str
    signature: tuple[str, ...]
    projections: tuple[ProjectionRule, ...]
    mlps: tuple[MLPRule, ...] = ()
    attention: str = ""
    blocks: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = ()
    image_models: tuple[str, ...] = ()
    pooled_y: bool = False
    native_latent: int = 128
    closed_form_note: str = ""   # why the closed form cannot edit this kind, and what to use ("" = it can)
    renames: tuple[tuple[str, str], ...] = ()   # (module pattern, diffusers template) for other layers

    # ---- detection ---------------------------------------------------------------------------
    def matched(self, modules: Iterable[str]) -> int:
        """How many of the signature's patterns these module paths match."""
        mods = list(modules)
        return sum(1 for pat in self.signature if any(re.fullmatch(pat, m) for m in mods))

    def matches(self, modules: Iterable[str]) -> bool:
        return self.matched(modules) == len(self.signature)

    def variant_of(self, modules: Iterable[str], config: Mapping | None = None) -> Variant:
        """The variant these modules (and ComfyUI's unet_config, where it says) are; the last one
        listed is the default."""
        mods = list(modules)
        config = dict(config or {})
        for v in self.variants[:-1]:
            if v.config and all(config.get(k) == val for k, val in v.config):
                return v
            if v.marks and all(any(re.fullmatch(p, m) for m in mods) for p in v.marks):
                return v
        return self.variants[-1]

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    # ---- parts -------------------------------------------------------------------------------
    def parts(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[TextProjection, ...], tuple[DiTMLP, ...]]:
        """The text projections and MLPs these (normalised, ``diffusion_model.``-prefixed) keys hold,
        with their widths; any subset of a model's keys gives the parts it names."""
        def shape(mod):
            s = shapes.get(f"{UNET_PREFIX}{mod}.weight")
            return tuple(s) if s is not None and len(s) == 2 else None

        projs = []
        for rule in self.projections:
            s = shape(rule.module)
            if s is not None:
                projs.append(TextProjection(rule.module, rule.source, int(s[0]), int(s[1]), rule.diffusers, rule.norm))
        tokens = [p for p in projs if p.source == "tokens"]
        hidden = tokens[0].rows if tokens else 0
        mlps = []
        for key in shapes:
            if not key.startswith(UNET_PREFIX) or not key.endswith(".weight"):
                continue
            mod = key[len(UNET_PREFIX):-len(".weight")]
            s = shape(mod)
            if s is None:
                continue
            for order, rule in enumerate(self.mlps):
                m = re.fullmatch(rule.pattern, mod)
                if m is None:
                    continue
                name = rule.diffusers.format(*m.groups()) if rule.diffusers else ""
                if rule.fused:
                    h = hidden or int(s[0])
                    mlps.append((order, int(m.group(1)), DiTMLP(mod, int(s[0]), int(s[1]) - h, h, name)))
                else:
                    mlps.append((order, int(m.group(1)), DiTMLP(mod, int(s[0]), int(s[1]), 0, name)))
                break
        mlps.sort(key=lambda t: (t[0], t[1]))
        return tuple(projs), tuple(m for _, _, m in mlps)

    # ---- training sets -----------------------------------------------------------------------
    def in_blocks(self, name: str) -> bool:
        return name.startswith(self.blocks)

    def is_attention(self, name: str) -> bool:
        return bool(self.attention) and re.fullmatch(self.attention, name) is not None

    # ---- names -------------------------------------------------------------------------------
    def diffusers_modules(self, module: str, variant: str = "", label: str = "") -> tuple[str, ...]:
        """A module path (``txt_in``) -> the diffusers transformer module(s) it is: one name, or
        several (with ``*`` marks, see the module's docstring) where diffusers keeps apart what the
        module fuses. KeyError for a layer whose diffusers name this adapter does not know."""
        v = self.variant(variant) if variant else None
        rules: list[tuple[str, str]] = list(v.renames) if v is not None else []
        if v is None or v.diffusers_names:
            rules += [(re.escape(r.module), r.diffusers) for r in self.projections if r.diffusers]
            rules += [(r.pattern, r.diffusers) for r in self.mlps if r.diffusers]
            rules += list(self.renames)
        for pat, template in rules:
            m = re.fullmatch(pat, module)
            if m:
                return tuple(template.format(*m.groups()).split("|"))
        raise KeyError(f"{module}: no diffusers name is known for this {label or self.label} layer")

    def diffusers_name(self, module_param: str, label: str = "", variant: str = "") -> str:
        """A module path with its parameter (``txt_in.weight``) -> the diffusers transformer's name,
        for the layers whose diffusers name this adapter knows and that diffusers does not split;
        KeyError otherwise (the LoRA export then writes names ComfyUI reads for every model)."""
        mod, _, param = module_param.rpartition(".")
        names = self.diffusers_modules(mod, variant, label)
        if len(names) > 1:
            raise KeyError(f"{module_param} is {len(names)} separate layers in diffusers ({', '.join(names)})")
        return f"{names[0].rstrip('*')}.{param}"


def fused(prefix: str, *parts: str) -> str:
    """The diffusers template of a Linear that diffusers keeps apart as `parts` under `prefix`:
    ``fused("blocks.{0}.attn", "to_q", "to_k", "to_v")`` = ``blocks.{0}.attn.to_q|...|blocks.{0}.attn.to_v``."""
    return "|".join(f"{prefix}.{p}" for p in parts)


def split_rows(parts: tuple[str, ...], rows: int, cols: int) -> list[tuple[str, int, int]]:
    """(name, first row, rows) of each diffusers part of a (rows, cols) weight: parts marked ``*``
    share what the others (``cols`` rows each) leave; ValueError when the shape does not split so."""
    shared = [p for p in parts if p.endswith("*")]
    rest = rows - cols * (len(parts) - len(shared))
    if (shared and (rest <= 0 or rest % len(shared))) or (not shared and rest != 0):
        raise ValueError(f"a ({rows}, {cols}) weight does not split into {' | '.join(parts)}")
    out, start = [], 0
    for p in parts:
        n = rest // len(shared) if p.endswith("*") else cols
        out.append((p.rstrip("*"), start, n))
        start += n
    return out


def register(adapter: DiTAdapter) -> DiTAdapter:
    if adapter.kind in ADAPTERS:
        raise ValueError(f"two DiT adapters named {adapter.kind!r}")
    ADAPTERS[adapter.kind] = adapter
    return adapter


def module_paths(keys: Iterable[str]) -> list[str]:
    """Module paths inside the diffusion model (no prefix, no parameter name) of these keys."""
    out = []
    for k in keys:
        if k.startswith(UNET_PREFIX):
            k = k[len(UNET_PREFIX):]
        out.append(k.rpartition(".")[0] if "." in k else k)
    return list(dict.fromkeys(out))


def detect_kind(keys: Iterable[str], config: Mapping | None = None) -> tuple[DiTAdapter | None, list[str]]:
    """(the one DiT adapter whose signature these keys or module paths match, the kinds that match):
    None with the matching kinds when none or more than one matches, or when ComfyUI's own config
    names a kind (`image_model`) other than the one the keys say."""
    mods = module_paths(keys)
    found = [a for a in ADAPTERS.values() if a.matches(mods)]
    if len(found) != 1:
        return None, [a.kind for a in found]
    image_model = (config or {}).get("image_model")
    if image_model and found[0].image_models and image_model not in found[0].image_models:
        return None, [found[0].kind, f"ComfyUI's config says {image_model}"]
    return found[0], [found[0].kind]


def guess_kind(keys: Iterable[str]) -> DiTAdapter | None:
    """The adapter of an edit named "custom" (a Flux.1 or SD3 layout no table names, the only DiT
    layouts called so) from its own keys, a subset of the model's: the one whose text projections or
    signature the keys touch; None when they touch neither's."""
    mods = module_paths(keys)
    for kind in ("flux", "sd3"):
        a = ADAPTERS.get(kind)
        if a is not None and (a.matched(mods) or any(r.module in mods for r in a.projections)
                              or any(re.fullmatch(r.pattern, m) for r in a.mlps for m in mods)):
            return a
    return None


def kind_of_variant(name: str) -> DiTAdapter | None:
    """The adapter whose variant (or custom name) is `name`."""
    for a in ADAPTERS.values():
        if any(v.name == name for v in a.variants):
            return a
    return None


def _variant(family) -> Variant | None:
    adapter = ADAPTERS.get(family.kind)
    return adapter.variant(family.variant) if adapter is not None else None


def text_encoders_read(family) -> str:
    """The text encoders (and the loader) a DiT variant reads, "" when its adapter does not say."""
    v = _variant(family)
    return v.hint if v is not None else ""


def clip_hint(family) -> str:
    """"<model>: <the CLIP it reads>, or " for a DiT whose adapter names its text encoders, else "":
    the start of an error message's advice on what to connect."""
    v = _variant(family)
    return f"{v.label}: {v.hint}, or " if v is not None and v.hint else ""

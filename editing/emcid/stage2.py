"""EMCID (Xiong et al. 2024): massive concept editing of the text encoder, MEMIT-style.

Two stages:
- stage 1 (`stage1.optimise_targets`, per concept, cacheable): find the residual-stream
  vector z = h + δ at the last edited layer, at the concept's last token, that makes the diffusion
  model denoise the source prompt as it denoises the destination prompt;
- stage 2 (`stage2`, closed form, all concepts at once): write Z into the edit layers l_1..l_L
  in order. For layer l_i: K = fc2 inputs at the concepts' last tokens (with the updates of the
  layers before l_i in place), R = (Z − B) / (L − i) where B is, by default, that layer's own fc2
  output (the official code's residual) or, as an option, the last edit layer's output (MEMIT's),
  and ΔW = R Kᵀ (λ C₀ + K Kᵀ)⁻¹ with C₀ = E[k kᵀ] over the BOS, real and EOS tokens of generic
  captions (`editing.emcid.captions`); λ may differ per text encoder and counts, by default, per
  dimension of the layer's keys (`absolute_lam`). ΔW is stored exactly as the
  low-rank pair up = R, down = (solve(λC₀ + KKᵀ, K))ᵀ while that is smaller than the dense matrix.

Hyper-parameters left unset come from the model family's table (`presets`, the official code's).

The library never runs ComfyUI: it reaches the text encoder through a `Text` host (see
`comfy_host.text_hooks.ComfyTextModel`) and reads/changes activations with forward hooks by module
name. The model's weights are never written: earlier layers' updates are applied with hooks.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Mapping, NamedTuple, Sequence

import torch

from .. import distributed
from ..arch import TextEncoderSpec
from ..distributed import load_checked, save_checked
from .captions import generic_captions
from ..edit import Change
from ..errors import InvalidInputError, NonFiniteError
from ..hooks import trace_inputs, trace_outputs
from ..hosts import RunContext, Text
from ..safety import refuse_unsafe
from .config import RESIDUALS, absolute_lam, EmcidConfig

log = logging.getLogger(__name__)
# An edit that leaves more than this share of its gap did not do what was asked (the node says so)
UNDER_REACH = 0.5


def resolve_defaults(cfg: EmcidConfig, family: str | None, encoders: Sequence[str],
                     kind: str | None = None, table=None) -> tuple[EmcidConfig, dict]:
    """`cfg` with every hyper-parameter left at None taken from the family's table (an unknown
    layout: SDXL's with two text encoders, else SD's); λ becomes per encoder where the table or a
    partial mapping decides it. Returns the config and {"table": key, "filled": [fields]} for the
    edit's params. Values the user set are kept. `lam_mode` left at None becomes "absolute" when
    λ is given (all of it or some encoders') and "relative" otherwise; the family's λ for an
    encoder the config leaves out is then its official value, or that value per key dimension.
    `table`: (key, `FamilyDefaults`) to take the values from instead of the family's (the official
    procedure's, `official.settings`)."""
    from .presets import TABLE_FIELDS, defaults_for
    key, table = table if table is not None else defaults_for(family, encoders, kind)
    changes, filled = {}, []
    for name in TABLE_FIELDS:
        if name == "lam":
            continue
        if getattr(cfg, name) is None:
            changes[name] = getattr(table, name)
            filled.append(name)
    if isinstance(cfg.residual, Mapping) or (cfg.residual is None and table.residual_per_encoder):
        # per encoder (SD3's table: memit on T5, official on the CLIPs); a partial mapping keeps the
        # table's value for the encoders it leaves out, as λ does
        given = dict(cfg.residual or {})
        unknown = sorted(set(given) - set(encoders))
        if unknown:
            raise InvalidInputError(f"a residual is given for {', '.join(unknown)}, which this CLIP does not have "
                                    f"(its text encoders: {', '.join(encoders)})")
        changes["residual"] = {e: given.get(e, table.residual_for(e)) for e in encoders}
        if any(e not in given for e in encoders) and "residual" not in filled:
            filled.append("residual")
    mode = cfg.lam_mode or ("relative" if cfg.lam is None else "absolute")
    if cfg.lam_mode is None:
        changes["lam_mode"] = mode
        filled.append("lam_mode")
    if cfg.lam is None or isinstance(cfg.lam, Mapping):
        given = dict(cfg.lam or {})
        unknown = sorted(set(given) - set(encoders))
        if unknown:
            raise InvalidInputError(f"λ is given for {', '.join(unknown)}, which this CLIP does not have "
                                    f"(its text encoders: {', '.join(encoders)})")
        of_table = table.relative_lam_for if mode == "relative" else table.lam_for
        lam = {e: float(given[e]) if e in given else of_table(e) for e in encoders}
        if any(e not in given for e in encoders):
            filled.append("lam")
        changes["lam"] = lam
    return replace(cfg, **changes), {"table": key, "filled": filled}


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``source -> destination`` (or ``source, destination``) per line; # comments and blank lines
    are ignored. An empty destination (``nudity ->``) maps the concept to the bare template."""
    pairs = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "->" in line:
            src, dst = line.split("->", 1)
        elif "," in line or "\t" in line:
            src, dst = line.replace("\t", ",").split(",", 1)
        else:
            raise InvalidInputError(f"line {i} ({raw.strip()!r}): write 'source -> destination', e.g. 'cat -> dog'")
        src, dst = src.strip().strip('"'), dst.strip().strip('"')
        if not src:
            raise InvalidInputError(f"line {i} ({raw.strip()!r}) has no source concept")
        pairs.append((src, dst))
    return pairs


def validate_pairs(pairs: Sequence[tuple[str, str]]) -> None:
    if not pairs:
        raise InvalidInputError("no concepts given: write one 'source -> destination' per line, e.g. 'cat -> dog'")
    seen = set()
    for src, dst in pairs:
        if not src.strip():
            raise InvalidInputError("a source concept is empty; every line needs 'source -> destination'")
        if src == dst:
            raise InvalidInputError(f"{src!r} is mapped to itself; nothing to edit")
        if src in seen:
            raise InvalidInputError(f"{src!r} appears twice; give each source concept one destination")
        seen.add(src)
    # stage 1 generates pictures of every source and destination in every template
    refuse_unsafe([f"{s} {d}" for s, d in pairs], what="concept pair")


# ---- prompts and token positions ---------------------------------------------------------------
def naming(host: Text, encoder: str) -> TextEncoderSpec:
    """Module names and token layout of one of the host's encoders (CLIP's or T5's)."""
    return TextEncoderSpec(encoder, 0, 0, 0, "", "", "", kind=getattr(host, "kinds", {}).get(encoder, "clip"))


@dataclass
class Prompts:
    """Every concept in every template: ids per encoder [n·T, L] and, per encoder, the index of the
    concept's last token."""

    text: list[str]
    ids: dict[str, torch.Tensor]
    pos: dict[str, torch.Tensor]  # encoder -> [n·T] (template-major inside a concept)
    n: int
    templates: int
    n_real: dict[str, torch.Tensor] | None = None  # encoder -> [n·T] each prompt's own tokens (no BOS/EOS)


def concept_prompts(host: Text, concepts: Sequence[str], templates: Sequence[str]) -> Prompts:
    text = [t.format(c) for c in concepts for t in templates]
    # the concept's last token is the last real token of "template prefix + concept" (tokenizers
    # split at word starts, so that prefix tokenizes as the start of the whole prompt). On CLIP
    # (causal) the key there depends only on that prefix; T5 attends both ways and reads it in the
    # whole prompt, which is what the ids below are. A causal LLM encoder (Qwen, Gemma, Mistral) keys
    # the same token, inside its chat template (`first_token`): there, as on CLIP, that token is the
    # first to have read the whole concept, and every later row (the rest of the prompt, the
    # template's closing tokens, which Qwen-Image and Z-Image read as context) sees the concept only
    # through it. Those later rows are EOS-like: their keys mix the concept with whatever follows
    # it, differ from template to template, and are rows a kept prompt has too, so editing there
    # would move kept prompts; the edit at the concept's last token reaches them through attention
    # in the layers after it, up to the layer the model reads.
    prefixes = [t.split("{}")[0] + c for c in concepts for t in templates]
    ids, n_text = host.tokenize(text)
    _, n_prefix = host.tokenize(prefixes)
    pos = {}
    for e in ids:
        first = _first_token(host, e)
        # an empty concept with an empty prefix falls back to the token after the prefix (EOS)
        pos[e] = (first + n_prefix[e].clamp(min=1) - 1).to(torch.long)
        if bool((pos[e] > first + n_text[e].clamp(min=1) - 1).any()):
            raise InvalidInputError(f"a concept reaches past the {e} text encoder's {ids[e].shape[1]}-token window; "
                                    "use shorter concepts/templates")
    return Prompts(text, ids, pos, len(concepts), len(templates), n_text)


def _first_token(host: Text, encoder: str) -> int:
    """Index of a prompt's first own token in `encoder`'s ids: the host's where it says (an LLM's chat
    template), else CLIP's 1 (after BOS) or T5's 0."""
    first = getattr(host, "first_token", None)
    return int(first(encoder)) if callable(first) else naming(host, encoder).first_token


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]


class _Stop(Exception):
    """Raised from a hook once everything needed is read: later layers need not run."""


# ---- reading keys and residuals -----------------------------------------------------------------
class LayerReads(NamedTuple):
    """What `read_layer` reads at each concept's last token, averaged over templates."""

    K: torch.Tensor | None       # [n, m] fc2 inputs at the fc2 layer
    H: torch.Tensor              # [n, d] output of the last layer
    M: torch.Tensor | None       # [n, d] fc2 outputs at the fc2 layer (its update included, if applied)


def read_layer(host: Text, encoder: str, prompts: Prompts, fc2_layer: int | None, last_layer: int,
               applied: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
               batch: int = 64) -> LayerReads:
    """fc2 inputs and outputs at `fc2_layer` and the output of `last_layer` at each concept's last
    token, averaged over templates, with the low-rank updates `applied` {layer: (R [d,r], X [m,r])}
    added to those fc2 outputs (ΔW k = R Xᵀ k) by hooks."""
    mods = host.modules(encoder)
    names = naming(host, encoder)
    applied = dict(applied or {})
    fc2_name = None if fc2_layer is None else names.fc2_module(fc2_layer)
    layer_of = {names.fc2_module(i): i for i in applied}
    keys, hs, ms = [], [], []
    for a, b in _chunks(len(prompts.text), batch):
        pos = prompts.pos[encoder][a:b]
        got: dict[str, torch.Tensor] = {}
        fc2_in: dict[str, torch.Tensor] = {}

        def store_in(name, x):
            fc2_in[name] = x
            if name == fc2_name:
                got["k"] = _gather(x, pos).double()

        def add_update(name, out):
            R, X = applied[layer_of[name]]
            x = fc2_in[name]
            return out + ((x.double() @ X) @ R.T).to(out.dtype)

        def read_fc2_out(name, out):
            got["m"] = _gather(out, pos).double()

        def read_last(name, out):
            got["h"] = _gather(out, pos).double()
            raise _Stop

        fc2_names = set(layer_of)
        if fc2_name is not None:
            fc2_names.add(fc2_name)
        with ExitStack() as stack:
            stack.enter_context(trace_inputs(mods, sorted(fc2_names), store_in))
            stack.enter_context(trace_outputs(mods, sorted(layer_of), add_update))
            if fc2_name is not None:  # registered after add_update: sees the updated output
                stack.enter_context(trace_outputs(mods, [fc2_name], read_fc2_out))
            stack.enter_context(trace_outputs(mods, [names.block_module(last_layer)], read_last))
            try:
                with torch.no_grad():
                    host.forward(encoder, prompts.ids[encoder][a:b])
            except _Stop:
                pass
        if "h" not in got:
            raise RuntimeError(f"layer {last_layer} of {encoder} never ran; is it a layer of this encoder?")
        hs.append(got["h"])
        if fc2_name is not None:
            if "k" not in got or "m" not in got:
                raise RuntimeError(f"fc2 of layer {fc2_layer} of {encoder} never ran before layer {last_layer}")
            keys.append(got["k"])
            ms.append(got["m"])

    def mean(parts):
        return torch.cat(parts).reshape(prompts.n, prompts.templates, -1).mean(1) if parts else None

    out = LayerReads(mean(keys), mean(hs), mean(ms))
    for name, t in (("keys", out.K), ("hidden states", out.H), ("fc2 outputs", out.M)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"the {encoder} text encoder produced NaN/Inf {name}; check the CLIP's weights "
                                 "(a broken checkpoint or an fp16 overflow)")
    return out


def read_keys(host: Text, encoder: str, prompts: Prompts, fc2_layer: int | None, last_layer: int,
              applied: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
              batch: int = 64) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(K [n, m] fc2 inputs at `fc2_layer`, H [n, d] output of `last_layer`): `read_layer` without M."""
    r = read_layer(host, encoder, prompts, fc2_layer, last_layer, applied, batch)
    return r.K, r.H


# ---- C₀: second moment of generic fc2 inputs ---------------------------------------------------
def text_fingerprint(host: Text, encoder: str) -> str:
    """A hash of the encoder's parameter names, shapes and a probe of their values (patched
    weights included), to key caches."""
    h = hashlib.sha256()
    for name, mod in host.modules(encoder).items():
        for pname, p in mod.named_parameters(recurse=False):
            v = p.detach().reshape(-1)[:4096].double()
            h.update(f"{name}.{pname}:{tuple(p.shape)}:{v.abs().sum().item():.6g}:{v.sum().item():.6g}".encode())
    return h.hexdigest()[:20]


def caption_mask(n_real: torch.Tensor, length: int, device=None, first_token: int = 1) -> torch.Tensor:
    """[B, length] True at the positions C₀ averages over: BOS (CLIP's; T5 has none, `first_token`
    0), the real tokens and EOS (not the padding). BOS is the same vector in every prompt and every
    prompt attends to it, so it must be in the preserved statistics: otherwise the edit is free to
    change it, and with it every prompt."""
    j = torch.arange(length, device=device)
    return j[None, :] <= n_real.to(device)[:, None] + first_token


C0_TOKENS = "bos-real-eos"  # which caption positions C₀ averages over (part of its cache name)


def second_moments(host: Text, encoder: str, layers: Sequence[int], cfg: EmcidConfig,
                   ctx: RunContext | None = None, cache_dir: str | None = None) -> dict[int, torch.Tensor]:
    """C₀ = E[k kᵀ] (float64, on the device) of each layer's fc2 inputs over the BOS, real and EOS
    tokens of generic captions (`caption_mask`), summed in float64, or in float32 under `cfg.official`
    as the official `layer_stats` does (returned as float64 either way). Cached per (encoder
    fingerprint, caption set, token choice and precision, layer) as safetensors."""
    ctx = ctx or RunContext()
    layers = sorted(set(int(i) for i in layers))
    fp = text_fingerprint(host, encoder) if cache_dir else ""
    caps = generic_captions(cfg.n_captions, cfg.caption_seed)
    # the official code sums k kᵀ in float32 (its mom2_dtype); it runs each caption unpadded, which on a
    # causal CLIP gives every kept row as the padded run does
    official = cfg.official != "off"
    acc = torch.float32 if official else torch.float64
    # a host whose captions sit in a template (an LLM's chat template) names it: one encoder's C₀ differs
    # between the templates two models wrap it in (Qwen-Image's and HunyuanImage's Qwen2.5-VL)
    around = getattr(host, "caption_tag", lambda _e: "")(encoder) + ("|float32" if official else "")
    tag = hashlib.sha256(("\n".join(caps) + "|" + C0_TOKENS + around).encode()).hexdigest()[:12]
    paths = {i: os.path.join(cache_dir, f"c0v3-{encoder}-{fp}-n{cfg.n_captions}s{cfg.caption_seed}-{tag}-l{i}.safetensors")
             for i in layers} if cache_dir else {}
    out: dict[int, torch.Tensor] = {}
    keys = {i: {"what": "emcid-c0", "encoder": encoder, "text": fp, "captions": cfg.n_captions,
                "caption_seed": cfg.caption_seed, "tag": tag, "layer": i} for i in layers}
    loaded = {i: load_checked(p, keys[i]) for i, p in paths.items()}
    # every rank from its cache, or every rank computes it together (its share of the captions)
    if cache_dir and int(distributed.all_reduce_max(torch.tensor([int(any(v is None for v in loaded.values()))]))[0]) == 0:
        for i, (tensors, _meta) in loaded.items():
            out[i] = tensors["c0"].to(host.device, torch.float64)
        log.info("C0 for %s layers %s from cache", encoder, layers)
        return out
    ids, n_real = host.tokenize(caps)
    mods = host.modules(encoder)
    spec = naming(host, encoder)
    names = {spec.fc2_module(i): i for i in layers}
    last = spec.fc2_module(max(layers))
    sums: dict[int, torch.Tensor] = {}
    count = 0
    t0 = time.perf_counter()
    chunks = list(_chunks(len(caps), cfg.batch))
    first = _first_token(host, encoder)
    mine = distributed.shard_indices(len(chunks))  # under torchrun each rank its share; the sums are all-reduced
    for c in mine:
        a, b = chunks[c]
        ctx.check()
        chunk = ids[encoder][a:b]
        # a host may name the rows itself (an LLM: the whole chat template, `ComfyTextModel.caption_rows`)
        rows = getattr(host, "caption_rows", None)
        mask = rows(encoder, chunk) if rows is not None else None
        if mask is None:
            mask = caption_mask(n_real[encoder][a:b], chunk.shape[1], host.device, first)
        mask = mask.to(host.device)

        def take(name, x, mask=mask):
            k = x[mask.to(x.device)].to(acc)
            i = names[name]
            sums[i] = sums[i] + k.T @ k if i in sums else k.T @ k
            if name == last:
                raise _Stop

        with trace_inputs(mods, list(names), take):
            try:
                with torch.no_grad():
                    host.forward(encoder, chunk)
            except _Stop:
                pass
        count += int(mask.sum())
        ctx.report(c + 1, len(chunks))
    if distributed.active():
        width = {i: int(s.shape[0]) for i, s in sums.items()}
        width = distributed.all_reduce_max(torch.tensor([width.get(i, 0) for i in layers]))
        parts = [sums.get(i, torch.zeros(int(w), int(w), dtype=acc, device=host.device)) for i, w in zip(layers, width)]
        *summed, total = distributed.all_reduce_sum(parts + [torch.tensor(float(count))])
        sums = {i: v.to(acc) for i, v in zip(layers, summed)}
        count = int(total)
    for i in layers:
        out[i] = (sums[i] / count).to(torch.float64)
        if not bool(torch.isfinite(out[i]).all()):
            raise NonFiniteError(f"{encoder} layer {i}: C0 has NaN/Inf; the text encoder produced non-finite activations")
    log.info("C0 for %s layers %s from %d caption tokens in %.1fs", encoder, layers, count, time.perf_counter() - t0)
    if cache_dir:
        for i, p in paths.items():
            # in float64, as computed: the solve's system (λC₀ + KKᵀ) is ill-conditioned enough that a
            # float32 copy of C₀ moved the tiny CLIP's edit by 30–50 % against the C₀ it was made from
            save_checked(p, {"c0": out[i]}, keys[i], {"tokens": str(count), "encoder": encoder, "layer": str(i)})
    return out


# ---- stage 2 ---------------------------------------------------------------------------------------
def solve_update(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = R Kᵀ (λC₀ + K Kᵀ)⁻¹ as (up = R [d, n], down = solve(λC₀ + KKᵀ, K)ᵀ [n, m]), in float64.

    K: [n, m] keys (one row per concept), R: [n, d] residuals. (λC₀ + KKᵀ) is symmetric, so
    R Kᵀ A⁻¹ = R (A⁻¹ K)ᵀ: one solve with n right-hand sides, never an explicit inverse."""
    K = K.to(torch.float64)
    R = R.to(device=K.device, dtype=torch.float64)
    A = lam * C0.to(device=K.device, dtype=torch.float64) + K.T @ K
    X = torch.linalg.solve(A, K.T)
    if not bool(torch.isfinite(X).all()):
        raise NonFiniteError("the EMCID solve gave NaN/Inf; raise λ or check C0 (it may be rank-deficient)")
    return R.T.contiguous(), X.T.contiguous()


def layer_reach(K: torch.Tensor, R: torch.Tensor, down: torch.Tensor) -> float:
    """The share of the change R asked of a layer that its update writes at the keys K:
    1 − ‖R − H R‖ / ‖R‖ with H = K (λC₀ + KᵀK)⁻¹ Kᵀ = K downᵀ (ΔW Kᵀ = Rᵀ H). One key alone gets
    q / (λ + q), q = kᵀ C₀⁻¹ k. Unlike the gap to Z it means the same for both residuals: the
    official one aims each fc2 output at Z, so its gap after stage 2 can exceed 1 with every layer
    writing all it was asked."""
    K = K.to(torch.float64)
    R = R.to(device=K.device, dtype=torch.float64)
    H = K @ down.to(device=K.device, dtype=torch.float64).T
    asked = float(R.norm())
    return 1.0 - float((R - H @ R).norm()) / asked if asked > 0 else 1.0


def stage2(host: Text, encoder: str, layers: Sequence[int], prompts: Prompts, Z: torch.Tensor,
           C0: Mapping[int, torch.Tensor], lam: float, batch: int = 64,
           ctx: RunContext | None = None, residual: str = "official",
           lam_mode: str = "absolute") -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], dict]:
    """Write Z into `layers` in order, each layer's update seeing the earlier ones. At layer l_i
    (i = 0..L−1) the residual is R_i = (Z − B_i) / (L − i), with B_i
      "official": the fc2 output of l_i itself (what EMCID's code subtracts: its
                  `get_module_input_output_at_words(..., rewrite_module_tmp.format(layer))[1]`),
      "memit":    the output of the last edit layer (MEMIT's: the gap still left to Z).
    `lam` counts as `lam_mode` says (`absolute_lam`, per layer from its keys' width).
    Returns [(layer, up [d,n], down [n,m])] (float64) and metrics: the share of ‖Z − H‖ (H: the
    last edit layer's output) left before each layer and after all of them, the λ each layer used
    and the share of its asked change each layer wrote (`layer_reach`)."""
    if residual not in RESIDUALS:
        raise InvalidInputError(f"residual must be one of {', '.join(RESIDUALS)}, got {residual!r}")
    ctx = ctx or RunContext()
    layers = list(layers)
    last = max(layers)
    applied: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    start = None
    left, lams, reach = [], [], []
    for i, layer in enumerate(layers):
        ctx.check()
        r = read_layer(host, encoder, prompts, layer, last, applied, batch)
        gap = Z.to(r.H) - r.H
        if start is None:
            start = float(gap.norm())
        left.append(float(gap.norm()) / max(start, 1e-12))
        base = r.M if residual == "official" else r.H
        R = (Z.to(base) - base) / (len(layers) - i)
        lams.append(absolute_lam(lam, lam_mode, int(C0[layer].shape[0])))
        up, down = solve_update(r.K, R, C0[layer], lams[-1])
        reach.append(layer_reach(r.K, R, down))
        applied[layer] = (up, down.T)
        out.append((layer, up, down))
        ctx.report(i + 1, len(layers))
    _, H = read_keys(host, encoder, prompts, None, last, applied, batch)
    final = float((Z.to(H) - H).norm()) / max(start or 0.0, 1e-12)
    return out, {"residual": residual, "gap_before_layer": left, "gap_after": final, "lam_per_layer": lams,
                 "reach_per_layer": reach}


def reach_warning(encoder: str, m: Mapping) -> str | None:
    """What to change when stage 2 fell short on one encoder (`m`: its stage-2 metrics). With MEMIT's
    residual: more than half of the gap to Z is left after the last layer. With the official one,
    whose gap is no measure of reach (it aims each fc2 output at Z, and its gap after stage 2 exceeds
    1 with every layer writing all it was asked): the layers wrote less than half of their change on
    average (`layer_reach`)."""
    reach = m.get("reach_per_layer") or []
    mean = sum(reach) / len(reach) if reach else 1.0
    gap = float(m["gap_after"])
    if m.get("residual") == "memit":
        if gap <= UNDER_REACH:
            return None
        what = f"closed only {100 * max(1 - gap, 0):.0f} % of the gap to the destination (gap_after {gap:.2f})"
    else:
        if mean >= 1 - UNDER_REACH:
            return None
        what = f"wrote only {100 * mean:.0f} % of the change asked of each layer on average (gap_after {gap:.2f})"
    if m.get("lam_mode") == "relative":
        now = (f"now {m['lam_rel']:g} relative, i.e. λ {m['lam']:g} on these {m['key_width']}-wide keys"
               + ("; a λ in the paper's units (thousands) needs lam_mode absolute" if m["lam_rel"] >= 50 else ""))
    else:
        now = (f"now {m['lam']:g} absolute, {m['lam_rel']:.3g} per dimension of these {m['key_width']}-wide keys; "
               "lam_mode relative scales the family's default to this width")
    return f"{encoder}: the edit {what}: lower lam ({now}) and compute it again"


def to_change(spec: TextEncoderSpec, up: torch.Tensor, down: torch.Tensor) -> Change:
    d, m = up.shape[0], down.shape[1]
    if up.shape[1] * (d + m) < d * m:
        return Change("lowrank", (d, m), {"up": up.float().cpu().contiguous(), "down": down.float().cpu().contiguous()})
    return Change("delta", (d, m), {"delta": (up @ down).float().cpu().contiguous()})


# ---- the method -------------------------------------------------------------------------------------

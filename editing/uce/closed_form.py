"""UCE-style closed-form cross-attention editing (Gandikota et al. 2023), for many concepts at once.

For every ``attn2.to_k`` / ``attn2.to_v`` weight W (out × d, d = text width), with edited token
vectors C (d × n), their targets V* = W G (G: d × n) and preserved token vectors P:

    W' = [λW + s_e V* Cᵀ + s_p (W P) Pᵀ] · M⁻¹,      M = λI + s_e C Cᵀ + s_p P Pᵀ

Subtracting W M from W' M leaves ΔW M = s_e (V* − W C) Cᵀ, so (M is symmetric)

    ΔW = s_e (V* − W C)(M⁻¹ C)ᵀ = W · A,      A = s_e (G − C)(M⁻¹ C)ᵀ   (d × d).

Every target this module builds is linear in W (erase/redirect/moderate: v* = W c_guide; debias:
v* = Σ_k w_k W c_k), so A depends on the text embeddings only. All K/V layers of a model share
one text width, hence ONE float64 solve serves all of them (16 blocks × 2 in SD1.x, 70 × 2 in
SDXL); each layer then costs one matrix product. When the edited token count n is small the change
is stored exactly as a low-rank pair up = s_e W (G − C) (out × n), down = (M⁻¹ C)ᵀ (n × d);
otherwise as a dense ΔW = W A. With n ≥ d only d × d Gram matrices are needed, accumulated over
chunks of tokens, so memory does not grow with the number of concepts.

Token choice (``token_window``):
- ``"auto"`` (default): ``"aligned"`` on a CLIP run of the context, ``"eos"`` on a T5 run (Flux,
  SD3). T5 is bidirectional and its padding is not masked, so every pad position holds a summary
  of the whole prompt, nearly the same for every prompt; editing them pulls all prompts along and
  fights the preserve set. Measured on the tiny Flux (erase "red", 8 prompts × 6 samples): red
  left 44 % with aligned, 23 % with eos; blue and green unchanged.
- ``"aligned"`` (auto on CLIP): every position of the concept prompt after BOS — its words, EOS and the
  padding — is edited. SD reads all 77 context vectors and CLIP is causal, so the concept is
  spread over every position after its words; editing the words alone leaves it in EOS/padding.
  Position p of the concept maps to position p − eos_concept + eos_guide of the guide (the two
  EOS line up, padding lines up with padding, the last word with the guide's last word), clamped
  to ≥ 1. The clamp matters for an empty guide: the concept's words then map to the EOS of ""
  (the unconditional summary) instead of BOS. BOS is the same vector for every prompt and acts as
  an attention sink; sending a concept's keys there would redirect attention, not erase.
- ``"eos"``: the concept's words through its EOS (the papers' wording), aligned the same way;
  padding is left alone. ~5 vectors per concept instead of 76: for thousands of concepts the
  cheapest full-word choice, weaker than "aligned" where the padding carries the concept.
- ``"last"``: only the concept's last word token (1 vector per concept; the newer UCE code). Its
  target is the guide's last word token, or the EOS of an empty guide — not BOS, for the same
  reason. Cheaper and lower-rank, but the concept survives in EOS/padding (weaker erasure).
BOS itself is always in the preserve set.

Official procedures (``official``, see `OFFICIAL_SOURCES`): ``"uce_sd_erase"`` and ``"train_erase"``
build the rows exactly as those scripts of the UCE repository do (`build_official_system`): the token
positions, the preserve set as given (an empty prompt allowed, duplicates counted, no default
prompts, no BOS row, nothing dropped) and λ in absolute units; the solve is the same closed form.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping, Sequence

import torch

from ..arch import Family
from ..edit import Change, Edit
from ..errors import InvalidInputError, NonFiniteError
from ..hosts import RunContext, Text
from .config import (EXPANSIONS, DEFAULT_GUIDE, DEFAULT_PRESERVE, OFFICIAL_SOURCES, EMPTY_PROMPT, UCEConfig,
                     parse_options)

log = logging.getLogger(__name__)

_CHUNK = 8192  # token vectors per Gram-accumulation chunk (bounds memory for thousands of concepts)


# ---- which token vectors: the text side of the system -------------------------------------------
@dataclass
class TextSystem:
    """Token vectors (rows) of the closed form: edited C, their targets G, preserved P."""

    C: torch.Tensor        # n × d
    G: torch.Tensor        # n × d
    P: torch.Tensor        # m × d
    concept_rows: list[int]  # rows per concept (for reporting)
    preserve_prompts: list[str]
    U: torch.Tensor | None = None  # the unconditional prompt's preserved rows (also in P), for its metric
    # G = G_select @ G_basis: the distinct guide token vectors (u × d) and a sparse n × u weight
    # matrix. Many concepts share a guide (erase to "" repeats one prompt's tokens n / 76 times),
    # so Cᵀ G and Gᵀ G cost O(n·d + u·d²) instead of two more n × d² Grams.
    G_basis: torch.Tensor | None = None
    G_select: torch.Tensor | None = None


def text_scale(system: TextSystem) -> float:
    """The mean square per coordinate of the edit's text rows, edited and preserved: tr(CᵀC + PᵀP) /
    ((n + m) d), the unit a relative λ counts in. M = λI + s_e CᵀC + s_p PᵀP: scaling every
    embedding by s scales both Grams by s², so λ must scale with them for the edit to stay the same
    (measured on the tiny SD: embeddings × 0.1 left 12 % of the target at λ 0.5, where × 1 left 2.5 %)."""
    total, rows = 0.0, 0
    for X in (system.C, system.P):
        for i in range(0, X.shape[0], _CHUNK):
            total += float(X[i:i + _CHUNK].double().square().sum())
        rows += X.shape[0]
    return total / max(rows * system.C.shape[1], 1)


def solve_lam(config: UCEConfig, system: TextSystem) -> dict:
    """The λ the solve uses for this system, and what it is in the other mode's units:
    {"lam": absolute, "lam_rel": per unit of `text_scale`, "text_scale": that mean square, "lam_mode"}."""
    scale = text_scale(system)
    if config.lam_mode == "relative":
        lam, rel = config.lam * scale, config.lam
    else:
        lam, rel = config.lam, config.lam / max(scale, 1e-30)
    return {"lam": lam, "lam_rel": rel, "text_scale": scale, "lam_mode": config.lam_mode}


@dataclass(frozen=True)
class Segment:
    """One text encoder's run of positions in the context: `ids` at context rows offset.., the
    first position of the prompt's own tokens (`start`: 1 for CLIP, after its BOS; 0 for T5, which
    has none; after the chat template's prefix for an LLM encoder) and its EOS id (the first template
    token after the prompt's; < 0 when none follows). `causal`: whether each row reads only the
    tokens before it, where the host measured it (`_scheme`)."""

    offset: int
    ids: tuple[int, ...]
    start: int
    eos_id: int
    causal: bool | None = None


def token_segments(text: Text, prompt: str, eos_id: int | None = None) -> list[Segment]:
    """The context's token runs for `prompt`: the host's ``token_segments`` when it has one (Flux:
    one T5 run without BOS; SD3: CLIP then T5; an LLM encoder: its template's run, read off the
    encoder by `comfy_host.text.ComfyText`), else one CLIP run with BOS at 0. A host's run is
    (offset, ids, start, eos id) or with `causal` after them."""
    get = getattr(text, "token_segments", None)
    if get is not None:
        return [Segment(int(r[0]), tuple(int(i) for i in r[1]), int(r[2]), int(r[3]),
                        None if len(r) < 5 or r[4] is None else bool(r[4])) for r in get(prompt)]
    ids = tuple(int(i) for i in text.token_ids(prompt))
    return [Segment(0, ids, 1, ids[1] if eos_id is None else eos_id)]


def _eos(ids: Sequence[int], eos_id: int, start: int = 1) -> int:
    """Position of the EOS: of `eos_id` from `start` on; len(ids), one past the last token, where no
    token follows the prompt's own (`eos_id` < 0: Lumina 2's Gemma context ends with the text)."""
    if eos_id < 0:
        return len(ids)
    for i in range(start, len(ids)):
        if ids[i] == eos_id:
            return i
    return len(ids) - 1  # truncated prompt: treat the last position as EOS


def _scheme(cfg: UCEConfig, seg: Segment) -> str:
    """The token window for one encoder run: `auto` is aligned on a causal encoder (CLIP, the LLMs:
    every row after the concept's words reads them) and eos on a bidirectional one (T5). Where the
    host did not measure it, a run with BOS (start > 0) counts as CLIP and one without as T5."""
    if cfg.token_window != "auto":
        return cfg.token_window
    if seg.causal is not None:
        return "aligned" if seg.causal else "eos"
    return "eos" if seg.start == 0 else "aligned"


def _window(ids: Sequence[int], eos_id: int, scheme: str, start: int = 1) -> list[int]:
    e = _eos(ids, eos_id, start)
    if scheme == "last":
        return [max(e - 1, start)]
    if scheme == "eos":
        return list(range(start, min(e + 1, len(ids))))
    return list(range(start, len(ids)))


def _aligned(p: torch.Tensor, e_src: int, e_dst: int, length: int, start: int = 1) -> torch.Tensor:
    """Guide positions for concept positions `p`: the EOS line up, clamped to [start, length − 1]
    (`length`: the guide's rows; a guide with no row from `start` on, an empty prompt that is only
    its template's prefix, maps to its last row)."""
    return (p - e_src + e_dst).clamp(min(start, length - 1), length - 1)


def _plan(cfg: UCEConfig, option_weights: Mapping[str, Sequence[float]] | None = None
          ) -> tuple[list[str], list[list[tuple[float, str]]]]:
    """Concept prompts and, per concept, the weighted guide prompts its values should take.
    `option_weights` (debias): a concept's own weights for the options in place of the guide's, as
    the iterative debias loop sets them (any real numbers: a weight may go below 0 or above 1)."""
    srcs, targets = [], []
    options = parse_options(cfg.guide) if cfg.mode == "debias" else None
    if option_weights is not None:
        check_option_weights(cfg, option_weights)
    for line in cfg.concepts:
        line = line.strip()
        if not line:
            continue
        src, arrow, dst = line.partition("->")
        src, dst = src.strip(), dst.strip()
        if not src:
            raise InvalidInputError(f"line {line!r} has no concept before '->'")
        if cfg.mode == "moderate":
            tgt = [(1.0, "")]
        elif cfg.mode == "debias":
            ws = option_weights.get(src) if option_weights else None
            tgt = [(w if ws is None else float(ws[k]), f"{o} {src}") for k, (o, w) in enumerate(options)]
        else:
            tgt = [(1.0, dst if arrow else (cfg.guide.strip() or
                                            (_default_guide(cfg) if cfg.mode == "erase" else "")))]
        if cfg.mode == "redirect" and tgt[0][1] == "":
            raise InvalidInputError(f'redirect: concept {src!r} has no target; write "{src} -> target" or set guide')
        srcs.append(src)
        targets.append(tgt)
    if cfg.mode in ("erase", "redirect"):
        # train_erase puts only the concept into the templates; its guide stays as it is
        guide_too = cfg.official != "train_erase"
        for template in EXPANSIONS[cfg.expand]:
            for src, tgt in list(zip(srcs, targets))[:len(_base_concepts(cfg))]:
                srcs.append(template.format(src))
                targets.append([(w, template.format(g).strip()) for w, g in tgt] if guide_too else list(tgt))
    return srcs, targets


def _default_guide(cfg: UCEConfig) -> str:
    """An erase's guide when none is given: the newest script's per-kind default ("art" for artists),
    the unconditional prompt in train_erase, which has no per-kind default."""
    return "" if cfg.official == "train_erase" else DEFAULT_GUIDE[cfg.expand]


def check_option_weights(cfg: UCEConfig, option_weights: Mapping[str, Sequence[float]]) -> None:
    """Per-concept debias weights must name this config's concepts and give one finite number per option."""
    if cfg.mode != "debias":
        raise InvalidInputError("option weights apply only to mode 'debias'")
    k = len(parse_options(cfg.guide))
    known = set(_base_concepts(cfg))
    for c, ws in option_weights.items():
        if c not in known:
            raise InvalidInputError(f"option weights for {c!r}, which is not one of the concepts {sorted(known)}")
        ws = list(ws)
        if len(ws) != k or not all(math.isfinite(float(w)) for w in ws):
            raise InvalidInputError(f"concept {c!r}: give {k} finite option weights, got {ws}")


def _base_concepts(cfg: UCEConfig) -> list[str]:
    """The concepts as the user named them (before any expansion)."""
    return [line.partition("->")[0].strip() for line in cfg.concepts if line.strip()]


def preserve_prompts(cfg: UCEConfig, concepts: Sequence[str]) -> list[str]:
    base = list(cfg.preserve) + (list(DEFAULT_PRESERVE) if cfg.default_preserve else [])
    words = sorted({c.lower().strip() for c in concepts if c.strip()}, key=len, reverse=True)
    # one alternation for all concepts (a pattern per concept × prompt took 3 s for 1,000 concepts)
    edited = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b") if words else None
    out = []
    for p in base:
        p = p.strip()
        if not p or p in out:
            continue
        if edited is not None and edited.search(p.lower()):
            continue  # never "preserve" what is being edited
        out.append(p)
    return out


def _pad_to(t: torch.Tensor, rows: int, left: bool) -> torch.Tensor:
    """Contexts `t` [b, n, d] with zero rows before (left) or after their rows, up to `rows`."""
    if t.shape[1] >= rows:
        return t
    z = t.new_zeros(t.shape[0], rows - t.shape[1], t.shape[2])
    return torch.cat([z, t] if left else [t, z], dim=1)


def _encoded_rows(text: Text, prompts: Sequence[str], first: torch.Tensor, wanted: torch.Tensor,
                  ctx: RunContext, stride: int | None = None, lengths: torch.Tensor | None = None,
                  left: bool = False, step: int = 64):
    """Encode `prompts` in chunks of `step`, keeping only the context rows `wanted` (flat indices
    prompt index · stride + row, stride the context length L by default); returns the lookup from
    such indices to those rows. `first` is the context of prompts[0], already encoded. `lengths`:
    each prompt's own rows, for a host whose contexts have the prompt's own length and whose batch
    pads them to the longest, after each prompt's rows or before them (`left`); None: every context
    has L rows."""
    L = first.shape[1]
    stride = stride or L
    need = torch.unique(wanted)  # sorted, so each chunk's rows are one slice of it
    kept = []
    for i in range(0, len(prompts), step):
        ctx.check()
        lo, hi = (int(torch.searchsorted(need, b * stride)) for b in (i, min(i + step, len(prompts))))
        if lo == hi:
            continue
        rest = list(prompts[max(i, 1):i + step])
        enc = text.encode(rest).detach() if rest else first[:0]
        if lengths is None and enc.shape[1] != L:
            raise InvalidInputError(f"the text encoder gave a context of {enc.shape[1]} positions where the empty "
                                    f"prompt has {L} (a prompt longer than the context?): shorten the prompts")
        if i == 0:
            rows = max(int(enc.shape[1]), L)
            enc = torch.cat([_pad_to(first.to(enc.device, enc.dtype), rows, left), _pad_to(enc, rows, left)])
        if not bool(torch.isfinite(enc).all()):
            raise NonFiniteError("the text encoder returned NaN/Inf embeddings; check the CLIP weights")
        flat = need[lo:hi]
        j, q = flat // stride, flat % stride
        if lengths is not None and left:
            q = q + enc.shape[1] - lengths[j]
        if lengths is not None and bool((q >= enc.shape[1]).any()):
            raise InvalidInputError(f"the text encoder gave a batch of {enc.shape[1]} context rows, fewer than its "
                                    "prompts' tokens name")
        kept.append(enc[(j - i).to(enc.device), q.to(enc.device)])
    table = torch.cat(kept)

    def rows(flat: torch.Tensor) -> torch.Tensor:
        return table[torch.searchsorted(need, flat).to(table.device)]
    return rows


def build_text_system(text: Text, cfg: UCEConfig, ctx: RunContext | None = None,
                      option_weights: Mapping[str, Sequence[float]] | None = None) -> TextSystem:
    """Encode every distinct prompt once and gather C, G, P by token position. The rows each prompt
    contributes are known from its tokens, so prompts are encoded in chunks and only those rows kept:
    at Flux size a full context is 256 × 4096 floats (4 MB), 1,000 concepts' contexts 4 GB.

    A host whose contexts have the prompt's own length (`context_varies`: the LLM encoders) gives
    each prompt its own rows, the rows its token runs span; every window and every guide position
    stays within its prompt's rows (a guide shorter than its concept maps the concept's last rows to
    its own last). Otherwise every context has the empty prompt's L rows, as CLIP and T5 give."""
    ctx = ctx or RunContext()
    srcs, targets = _plan(cfg, option_weights)
    keep = preserve_prompts(cfg, srcs)
    prompts = list(dict.fromkeys([""] + srcs + [p for t in targets for _, p in t] + keep))
    index = {p: i for i, p in enumerate(prompts)}
    empty = token_segments(text, "")
    segs = {p: token_segments(text, p, empty[0].eos_id) if p else empty for p in prompts}
    if any([(g.offset, g.start, g.eos_id) for g in segs[p]] != [(g.offset, g.start, g.eos_id) for g in empty]
           for p in prompts):
        raise InvalidInputError("the text encoder tokenizes prompts into differently laid out contexts "
                                "(a prompt longer than the context?): shorten the prompts")
    first = text.encode([""]).detach()  # the context length L; prompts[0] is ""
    L = int(first.shape[1])
    varies = bool(getattr(text, "context_varies", False))
    # each prompt's context rows, and the rows of one of its runs that exist
    own = {p: max(g.offset + len(g.ids) for g in segs[p]) if varies else L for p in prompts}

    def end(seg: Segment) -> int:
        return len(seg.ids) if varies else min(len(seg.ids), L - seg.offset)
    S = max([L] + list(own.values()))  # flat row index: prompt index · S + row

    # Rows as (prompt index, token position) tensors, one small vectorised block per concept: at
    # 1,000 concepts × 76 tokens, per-row Python bookkeeping cost more than the solve.
    concept_rows: list[int] = []
    c_u, c_q = [], []
    n_slots = max(len(t) for t in targets)
    slot_w: list[list[torch.Tensor]] = [[] for _ in range(n_slots)]
    slot_key: list[list[torch.Tensor]] = [[] for _ in range(n_slots)]  # prompt index * S + position
    for src, tgt in zip(srcs, targets):
        n_rows = 0
        for si, seg in enumerate(segs[src]):
            e_s = _eos(seg.ids, seg.eos_id, seg.start)
            if e_s <= seg.start:
                raise InvalidInputError(f"concept {src!r} has no tokens")
            e_end = end(seg)
            pos = torch.tensor([p for p in _window(seg.ids, seg.eos_id, _scheme(cfg, seg), seg.start) if p < e_end],
                               dtype=torch.long)
            n_rows += int(pos.numel())
            c_u.append(torch.full_like(pos, index[src]))
            c_q.append(pos + seg.offset)
            for k in range(n_slots):
                w, gp = tgt[k] if k < len(tgt) else (0.0, "")
                g = segs[gp][si]
                g_end = end(g)
                e_g = _eos(g.ids, g.eos_id, g.start)
                if _scheme(cfg, seg) == "last":
                    # an empty guide has no last word: its EOS, or (official code) the position before the text
                    no_word = max(g.start - 1, 0) if cfg.empty_guide == "bos" else e_g
                    q = torch.full_like(pos, min(max(e_g - 1, g.start) if e_g > g.start else no_word, g_end - 1))
                else:
                    q = _aligned(pos, e_s, e_g, g_end, g.start)
                slot_w[k].append(torch.full(pos.shape, float(w), dtype=torch.float64))
                slot_key[k].append(index[gp] * S + q + g.offset)
        concept_rows.append(n_rows)
    p_u, p_q = [], []
    for p in keep:
        qs = [q + seg.offset for seg in segs[p]
              for q in _window(seg.ids, seg.eos_id, _scheme(cfg, seg), seg.start) if q < end(seg)]
        p_u += [index[p]] * len(qs)
        p_q += qs
    # The rows before the prompt's own tokens, the same for every prompt: CLIP's BOS (the attention
    # sink) and a chat template's prefix on a causal LLM (T5 has none); and, with
    # preserve_unconditional, "" at every position the window edits in some concept that "" has
    bos = [seg.offset + i for seg in empty for i in range(min(seg.start, end(seg)))]
    edited_positions = (sorted(q for q in set(torch.cat(c_q).tolist()) - set(bos) if q < own[""])
                        if cfg.preserve_unconditional else [])
    u_q = bos + edited_positions
    p_u += [index[""]] * len(u_q)
    p_q += u_q

    c_flat = torch.cat(c_u) * S + torch.cat(c_q)
    n = int(c_flat.numel())
    w_all = torch.cat([torch.cat(ws) for ws in slot_w])
    key_all = torch.cat([torch.cat(ks) for ks in slot_key])
    row_all = torch.arange(n).repeat(n_slots)
    nz = w_all != 0
    keys, col = torch.unique(key_all[nz], return_inverse=True)  # the distinct guide token vectors
    p_flat = torch.tensor(p_u, dtype=torch.long) * S + torch.tensor(p_q, dtype=torch.long)
    u_flat = index[""] * S + torch.tensor(u_q, dtype=torch.long)  # empty for T5 without preserve_unconditional
    lengths = torch.tensor([own[p] for p in prompts], dtype=torch.long) if varies else None
    rows = _encoded_rows(text, prompts, first, torch.cat([c_flat, keys, p_flat, u_flat]), ctx, S, lengths,
                         bool(getattr(text, "pads_left", False)))
    C = rows(c_flat)
    dev = C.device
    basis = rows(keys)
    select = torch.sparse_coo_tensor(torch.stack([row_all[nz], col]), w_all[nz], (n, int(keys.numel())),
                                     device=dev, check_invariants=False).coalesce()
    G = torch.sparse.mm(select.float(), basis.float()).to(C.dtype) if keys.numel() else torch.zeros_like(C)
    P = rows(p_flat)
    U = rows(u_flat)
    return TextSystem(C=C, G=G, P=P, concept_rows=concept_rows, preserve_prompts=keep, U=U, G_basis=basis,
                      G_select=select)


# ---- the official scripts' rows (`UCEConfig.official`) ------------------------------------------
def script_preserve_scale(official: str, preserve: Sequence[str]) -> float:
    """The preserve_scale a procedure uses when none is given: the pack's 0.1, uce_sd_erase's argparse
    default 1, train_erase's max(0.1, 1 / retained prompts) (its retained prompts: "" and the preserve list)."""
    if official == "uce_sd_erase":
        return 1.0
    if official == "train_erase":
        return max(0.1, 1.0 / (1 + len(preserve)))
    return UCEConfig.preserve_scale


def official_preserve(cfg: UCEConfig) -> list[str]:
    """The prompts an official script keeps, in its order and multiplicity: the user's list as given
    (an empty entry or a line ``""`` is the empty prompt; duplicates and prompts naming an edited concept
    stay, the scripts count each), after "" in train_erase, which always retains it first."""
    given = ["" if p.strip() == EMPTY_PROMPT else p.strip() for p in cfg.preserve]
    return ([""] if cfg.official == "train_erase" else []) + given


# The pack's settings each official procedure fixes: setting -> ({procedure: the value it behaves as, None
# where no value of the setting does what it does}, why a change to the setting is ignored)
_OFFICIAL_FIXED = {
    "token_window": ({"uce_sd_erase": "last", "train_erase": None},
                     "the script picks its own token positions"),
    "preserve_unconditional": ({"uce_sd_erase": False, "train_erase": True},
                               ("the script keeps the empty prompt where its preserve list names it (train_erase: "
                                "always, at every position)")),
    "lam_mode": ({"uce_sd_erase": "absolute", "train_erase": "absolute"}, "the script's λ is absolute"),
    "harden_rounds": ({"uce_sd_erase": 0, "train_erase": 0}, "the script does no RECE hardening"),
    "edit_keys": ({"uce_sd_erase": True, "train_erase": True}, "the script edits every attn2 to_k and to_v"),
    "edit_values": ({"uce_sd_erase": True, "train_erase": True}, "the script edits every attn2 to_k and to_v"),
}


def official_warnings(cfg: UCEConfig) -> list[str]:
    """One line per pack-only setting the user changed from its default that `cfg.official` ignores.
    A setting left at its default, or set to what the script does anyway, says nothing; the settings the
    script always fixes (default_preserve, empty_guide, the BOS row, dropping edited and repeated
    preserve prompts) are listed in the docs."""
    if cfg.official == "off":
        return []
    out = []
    defaults = UCEConfig(concepts=[])
    for name, (fixed, why) in _OFFICIAL_FIXED.items():
        value = getattr(cfg, name)
        if value == getattr(defaults, name) or value == fixed[cfg.official]:
            continue
        out.append(f"official {cfg.official} ignores {name}={value!r}: {why}")
    return out


def official_config(cfg: UCEConfig) -> UCEConfig:
    """The settings a solve under `cfg.official` reads: λ absolute, both K and V, no hardening (the rows
    themselves come from `build_official_system`)."""
    if cfg.official == "off":
        return cfg
    return replace(cfg, lam_mode="absolute", harden_rounds=0, edit_keys=True, edit_values=True,
                   default_preserve=False)


def _official_run(text: Text, cfg: UCEConfig) -> Segment:
    """The empty prompt's one CLIP run (BOS at 0, a context of fixed length): the only layout the
    official Stable Diffusion scripts read; anything else (T5, an LLM's template) is refused."""
    empty = token_segments(text, "")
    if len(empty) != 1 or empty[0].start < 1 or empty[0].offset != 0 or getattr(text, "context_varies", False):
        raise InvalidInputError(f"official {cfg.official!r} follows UCE's Stable Diffusion script, which reads one "
                                "CLIP run with a BOS token; this text encoder gives another layout: set official to off")
    return empty[0]


def build_official_system(text: Text, cfg: UCEConfig, ctx: RunContext | None = None) -> TextSystem:
    """C, G, P as the official script `cfg.official` gathers them (repository and commit in
    `OFFICIAL_SOURCES`). With a prompt's last word at w = (its attention mask's sum) − 2, i.e. the
    position before its EOS (0, BOS, for ""):

    - uce_sd_erase: one row per concept, its row w; the target the guide's row w (BOS for ""); one row
      per preserve prompt, its row w.
    - train_erase (technique 'replace'): per concept, its rows from w to the end of the context, paired
      with the guide's rows from the guide's w (the two EOS line up; for "" the concept's last word
      goes to BOS); with f = max of the two w, both windows are L − f long, so whichever starts later
      keeps its tail and the other loses it. Every position (BOS and padding too) of "" and of each
      preserve prompt is kept.

    U (the empty prompt's BOS and its rows at the edited positions) serves only the metric of how
    much the unconditional prompt moved."""
    ctx = ctx or RunContext()
    srcs, targets = _plan(cfg)
    keep = official_preserve(cfg)
    prompts = list(dict.fromkeys([""] + srcs + [p for t in targets for _, p in t] + keep))
    index = {p: i for i, p in enumerate(prompts)}
    empty = _official_run(text, cfg)
    runs = {p: token_segments(text, p, empty.eos_id) if p else [empty] for p in prompts}
    if any([(g.offset, g.start) for g in r] != [(empty.offset, empty.start)] for r in runs.values()):
        raise InvalidInputError("the text encoder tokenizes prompts into differently laid out contexts "
                                "(a prompt longer than the context?): shorten the prompts")
    segs = {p: r[0] for p, r in runs.items()}
    first = text.encode([""]).detach()
    L = int(first.shape[1])
    last = {p: _eos(s.ids, s.eos_id, s.start) - 1 for p, s in segs.items()}  # the position before EOS
    end = {p: min(len(s.ids), L) for p, s in segs.items()}
    c_flat, g_flat, concept_rows = [], [], []
    for src, tgt in zip(srcs, targets):
        guide = tgt[0][1]
        if last[src] < segs[src].start:
            raise InvalidInputError(f"concept {src!r} has no tokens")
        if cfg.official == "uce_sd_erase":
            pairs = [(last[src], last[guide])]
        else:
            far = max(last[src], last[guide])
            pairs = [(last[src] + k, last[guide] + k) for k in range(min(end[src], end[guide]) - far)]
        c_flat += [index[src] * L + a for a, _ in pairs]
        g_flat += [index[guide] * L + b for _, b in pairs]
        concept_rows.append(len(pairs))
    p_flat = []
    for p in keep:
        rows = [last[p]] if cfg.official == "uce_sd_erase" else range(end[p])
        p_flat += [index[p] * L + q for q in rows]
    edited = sorted({q % L for q in c_flat} - set(range(empty.start)))
    u_flat = [index[""] * L + q for q in list(range(empty.start)) + edited]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    c_t, g_t, p_t, u_t = (as_tensor(x) for x in (c_flat, g_flat, p_flat, u_flat))
    rows = _encoded_rows(text, prompts, first, torch.cat([c_t, g_t, p_t, u_t]), ctx, L)
    C = rows(c_t)
    return TextSystem(C=C, G=rows(g_t).to(C.dtype), P=rows(p_t).to(C.dtype), concept_rows=concept_rows,
                      preserve_prompts=keep, U=rows(u_t).to(C.dtype))


# ---- the closed form, shared by all layers of one text width -------------------------------------
class _LazyDense:
    """An Operator field holding a d × d matrix. The row-space solve leaves these unset (at Flux.2's
    d = 15,360 each would be 1.9 GB) since the edit itself reads only the factors; reading one builds
    it from those factors (`Operator.low`) and keeps it."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, op, owner=None):
        if op is None:
            return None  # the dataclass default
        if self.name not in op.__dict__:
            if op.low is None:
                return None
            op.__dict__[self.name] = _dense_from_factors(op, self.name)
        return op.__dict__[self.name]

    def __set__(self, op, value):
        if value is None:
            op.__dict__.pop(self.name, None)
        else:
            op.__dict__[self.name] = value


@dataclass(repr=False, eq=False)
class Operator:
    """ΔW = W·A for every layer of text width d; exact factors A = R Dᵀ when n < d.

    From the dense route (see `solve_operator`) every field is set. The metrics need only d × d
    matrices: for any X, ‖W X‖²_F = ⟨WᵀW, X Xᵀ⟩, so per layer one WᵀW serves the preservation change
    ‖ΔW P‖/‖W P‖ and the target residual; with few edited vectors (`low`) the same numbers come from
    the rank-n factors without forming WᵀW. From the row-space route only R, D and `low` are set:
    the d × d fields below are built from them when read (tests, RECE's dense form), never by the
    edit itself."""

    R: torch.Tensor | None   # d × n: s_e (G − C)ᵀ     (up = W R)
    D: torch.Tensor | None   # d × n: M⁻¹ Cᵀ           (down = Dᵀ)
    A: torch.Tensor | None = _LazyDense()               # d × d, ΔW = W A
    preserve_gram: torch.Tensor | None = _LazyDense()   # Σ p pᵀ
    preserve_moved: torch.Tensor | None = _LazyDense()  # A (Σ p pᵀ) Aᵀ: what ΔW does to the preserved vectors
    residual_gram: torch.Tensor | None = _LazyDense()   # Σ e eᵀ, e = (I + A)c − g: what is left of the targets
    target_gram: torch.Tensor | None = _LazyDense()     # Σ (c − g)(c − g)ᵀ: the gap before the edit
    uncond_gram: torch.Tensor | None = _LazyDense()     # Σ u uᵀ over the unconditional prompt's rows
    uncond_moved: torch.Tensor | None = _LazyDense()    # A (Σ u uᵀ) Aᵀ
    low: "LowRankMetrics | None" = None       # the same metrics from rank-n factors (n < d)

    @property
    def n(self) -> int:
        return 0 if self.R is None else self.R.shape[1]

    @property
    def device(self) -> torch.device:
        return (self.R if self.R is not None else self.A).device

    @property
    def row_space(self) -> bool:
        """Solved in the row space: no d × d matrix is held until one of the fields is read."""
        return self.low is not None and "A" not in self.__dict__

    def __repr__(self) -> str:  # without building the lazy fields
        d = None if self.D is None else self.D.shape[0]
        return f"Operator(n={self.n}, d={d}, row_space={self.row_space})"


@dataclass
class LowRankMetrics:
    """The per-layer metrics of A = R Dᵀ (rank n) with no d × d matrix. With w_gap = W (C − G)ᵀ
    (out × n): up = W R = −s_e w_gap; the residuals e = (I + A)c − g give W Eᵀ = w_gap Nc; and
    ΔW Pᵀ = up (P D)ᵀ, so ‖ΔW Pᵀ‖² = ‖up Fpᵀ‖² for any Fp with Fpᵀ Fp = (P D)ᵀ(P D) (Fu for U
    likewise); ‖W Xᵀ‖² is read off W Xᵀ. A layer costs one W · `right` (O(out·d·(n + m + u))) and
    O(out·n²), plus one W·(Σ p pᵀ) when the preserve rows outnumber d (dense route only)."""

    right: torch.Tensor       # d × (n + m + u), float64: [(C − G)ᵀ | Pᵀ | Uᵀ]; Pᵀ only when m ≤ d
    widths: tuple[int, int, int]  # n, m (0 when Gpp32 is used), u
    erase_scale: float
    Nc: torch.Tensor          # n × n: I − s_e Dᵀ Cᵀ
    Fp: torch.Tensor          # k × n (k ≤ n): Fpᵀ Fp = Dᵀ (Σ p pᵀ) D
    Fu: torch.Tensor | None = None     # k × n: Fuᵀ Fu = Dᵀ (Σ u uᵀ) D
    Gpp32: torch.Tensor | None = None  # Σ p pᵀ in float32, when the preserve rows outnumber d

    @staticmethod
    def work(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def at(self, dtype: torch.dtype) -> LowRankMetrics:
        """These factors in `dtype` (float32 copies made once, for the per-layer products)."""
        if dtype == self.right.dtype:
            return self
        cache = self.__dict__.setdefault("_copies", {})
        if dtype not in cache:
            cast = lambda X: None if X is None else X.to(dtype)  # noqa: E731
            cache[dtype] = LowRankMetrics(right=cast(self.right), widths=self.widths, erase_scale=self.erase_scale,
                                          Nc=cast(self.Nc), Fp=cast(self.Fp), Fu=cast(self.Fu), Gpp32=self.Gpp32)
        return cache[dtype]


def _dense_from_factors(op: Operator, name: str) -> torch.Tensor | None:
    """One d × d field of a row-space Operator, from R, D and `op.low` (see LowRankMetrics)."""
    low, R = op.low, op.R
    gap, Pt, Ut = low.right.split(list(low.widths), dim=1)
    outer = lambda X: X @ X.T  # noqa: E731
    if name == "A":
        return R @ op.D.T
    if name == "target_gram":
        return outer(gap)
    if name == "residual_gram":
        return outer(gap @ low.Nc)
    if name == "preserve_gram":
        return outer(Pt) if low.Gpp32 is None else low.Gpp32.double()
    if name == "preserve_moved":
        return outer(R @ low.Fp.T)
    if name == "uncond_gram":
        return outer(Ut) if low.Fu is not None else None
    if name == "uncond_moved":
        return outer(R @ low.Fu.T) if low.Fu is not None else None
    raise KeyError(name)


def _psd_root(Q: torch.Tensor) -> torch.Tensor:
    """F with Fᵀ F = Q for a symmetric positive semi-definite Q (n × n)."""
    ev, V = torch.linalg.eigh((Q + Q.T) / 2)
    return (V * ev.clamp_min(0).sqrt()).T


def _few_rows(F: torch.Tensor) -> torch.Tensor:
    """F' with F'ᵀ F' = Fᵀ F and at most F.shape[1] rows (the R of F's QR when F is tall), so that
    ‖X F'ᵀ‖² costs O(out·n·min(k, n)) per layer."""
    return torch.linalg.qr(F, mode="r").R if F.shape[0] > F.shape[1] else F


def _chunks(x: torch.Tensor):
    for i in range(0, x.shape[0], _CHUNK):
        yield x[i:i + _CHUNK]


def _gram(x: torch.Tensor, y: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """xᵀy accumulated in float64 over row chunks (x, y: n × d). Each chunk's product runs in the
    data's own precision when that is float32 or lower (real text embeddings: twice the speed of a
    float64 product, error ~1e-6 relative per chunk) and in float64 for float64 data."""
    d = x.shape[1]
    out = torch.zeros(d, d if y is None else y.shape[1], dtype=torch.float64, device=device)
    work = torch.float64 if torch.float64 in (x.dtype, getattr(y, "dtype", None)) else torch.float32
    for i in range(0, x.shape[0], _CHUNK):
        a = x[i:i + _CHUNK].to(device=device, dtype=work)
        b = a if y is None else y[i:i + _CHUNK].to(device=device, dtype=work)
        out += (a.T @ b).double()
    return out


_MAX_BASIS = 2048  # distinct guide vectors up to which the factored Grams are used (u × u dense)


def _factored_guide_grams(C: torch.Tensor, basis: torch.Tensor, select: torch.Tensor, device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cᵀ G, Gᵀ G) for G = select @ basis without forming n × d² products."""
    S = select.to(device=device).coalesce()
    V = basis.to(device=device, dtype=torch.float64)
    rows, cols = S.indices()
    w = S.values().to(torch.float64)
    work = torch.float64 if C.dtype == torch.float64 else torch.float32  # as in _gram
    SC = torch.zeros(V.shape[0], C.shape[1], dtype=torch.float64, device=device)  # Sᵀ C
    for i in range(0, rows.numel(), _CHUNK):
        r, c = rows[i:i + _CHUNK], cols[i:i + _CHUNK]
        part = torch.zeros(V.shape[0], C.shape[1], dtype=work, device=device)
        part.index_add_(0, c, w[i:i + _CHUNK, None].to(work) * C[r.to(C.device)].to(device=device, dtype=work))
        SC += part.double()
    StS = torch.zeros(V.shape[0], V.shape[0], dtype=torch.float64, device=device)  # Sᵀ S, by dense row chunks
    n = S.shape[0]
    for i in range(0, n, _CHUNK):
        m = (rows >= i) & (rows < i + _CHUNK)
        block = torch.zeros(min(_CHUNK, n - i), V.shape[0], dtype=torch.float64, device=device)
        block.index_put_((rows[m] - i, cols[m]), w[m], accumulate=True)
        StS += block.T @ block
    return SC.T @ V, V.T @ StS @ V


# the dense route's layer metrics from the rank-n factors when 8·n ≤ d (with the aligned window's 76
# vectors per concept: SD1.5 1 concept, SDXL 3); the row space always reads them so
_LOW_RANK_LAYER_METRICS = 8


def _spd_solve(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """M⁻¹ B for the symmetric M = λI + s_e CᵀC + s_p PᵀP (or the row space's H = λS⁻¹ + X Xᵀ): by
    Cholesky (half an LU's work) when M is positive definite, else by LU, which raises on a singular
    M (λ = 0 with too few vectors)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(M, B)


def _rows_gram(X: torch.Tensor, Y: torch.Tensor, device) -> torch.Tensor:
    """X Yᵀ (rows × rows, float64) accumulated over chunks of the width, each chunk's product in the
    data's own precision as in `_gram`."""
    out = torch.zeros(X.shape[0], Y.shape[0], dtype=torch.float64, device=device)
    work = torch.float64 if torch.float64 in (X.dtype, Y.dtype) else torch.float32
    for j in range(0, X.shape[1], _CHUNK):
        a = X[:, j:j + _CHUNK].to(device=device, dtype=work)
        b = a if Y is X else Y[:, j:j + _CHUNK].to(device=device, dtype=work)
        out += (a @ b.T).double()
    return out


def _xt_times(X: torch.Tensor, B: torch.Tensor, device) -> torch.Tensor:
    """Xᵀ B in float64 (d × k) for rows X (r × d), a chunk of the width at a time."""
    out = torch.empty(X.shape[1], B.shape[1], dtype=torch.float64, device=device)
    for j in range(0, X.shape[1], _CHUNK):
        out[j:j + _CHUNK] = X[:, j:j + _CHUNK].to(device=device, dtype=torch.float64).T @ B
    return out


def _uses_row_space(n: int, m: int, u: int, d: int, lam: float, erase_scale: float, preserve_scale: float) -> bool:
    """The row-space route when all the rows the solve and its metrics read (n + m + u) are fewer
    than d: then each r × r matrix is smaller than a d × d one, and the solve costs O(r²d + r³)
    instead of O(d²r + d³). Measured on the 2-core CPU (d = 2048, n = r / 2, float32 rows, one
    1280 × 2048 layer), solve + layer, row space against dense: r = d/2 1.5 s / 5.7 s, r = 0.8 d
    2.2 s / 7.2 s, r = d 2.7 s / 7.8 s, r = 1.3 d 5.2 s / 9.8 s. Each further layer costs about the
    same either way (0.54–0.67 s against 0.5 s near r = d: out·d·r + out·n² against out·d²), so the
    row space would still win somewhat past r = d, but its r × r matrices outgrow the d × d ones
    there: the rule stays r < d. Negative scales or s_e = 0 (outside `UCEConfig.validate`) stay dense."""
    return n + m + u < d and erase_scale > 0 and preserve_scale >= 0 and lam >= 0


def _row_space_operator(C: torch.Tensor, G: torch.Tensor, P: torch.Tensor, U: torch.Tensor | None, lam: float,
                        erase_scale: float, preserve_scale: float, device) -> Operator:
    """`solve_operator` in the row space of X = [C; P] (r × d, r < d), no d × d matrix.

    With S = diag(s_e·1_n, s_p·1_m), M = λI + Xᵀ S X and M Xᵀ = Xᵀ (λI + S X Xᵀ), so
    M⁻¹ Xᵀ = Xᵀ (λ S⁻¹ + X Xᵀ)⁻¹ S⁻¹ and D = M⁻¹ Cᵀ = Xᵀ B with H B = [I_n; 0] / s_e,
    H = λ S⁻¹ + X Xᵀ (r × r, positive definite for λ > 0). The block rows of H B give the products
    the metrics need without cancellation: s_e C D = I − λ B_C, so Nc = I − s_e Dᵀ Cᵀ = λ B_Cᵀ; and
    P D = −(λ / s_p) B_P. With s_p = 0 the preserve rows are not in M and P D = (P Xᵀ) B."""
    n, d = C.shape
    m = P.shape[0]
    in_m = preserve_scale > 0 and m > 0
    X = torch.cat([C, P.to(C.dtype)]) if in_m else C
    K = _rows_gram(X, X, device)
    if not bool(torch.isfinite(K).all()):
        raise NonFiniteError("the text embeddings give a non-finite system (NaN/Inf); nothing was edited")
    if lam == 0:  # M = Xᵀ S X has rank ≤ r < d
        raise InvalidInputError(f"the closed form is singular (λ = 0 with {X.shape[0]} text vectors in a "
                                f"{d}-wide space); raise λ (lam) above 0")
    inv_s = torch.full((X.shape[0],), lam / erase_scale, dtype=torch.float64, device=device)
    if in_m:
        inv_s[n:] = lam / preserve_scale
    H = K + torch.diag(inv_s)
    del K
    rhs = torch.zeros(X.shape[0], n, dtype=torch.float64, device=device)
    rhs[:n].fill_diagonal_(1.0 / erase_scale)
    try:
        B = _spd_solve(H, rhs)
    except torch.linalg.LinAlgError as e:
        raise InvalidInputError(f"the closed form is singular ({e}); raise λ (lam) above 0") from None
    del H, rhs
    U = U if U is not None and U.shape[0] else None
    u = 0 if U is None else U.shape[0]
    right = torch.empty(d, n + m + u, dtype=torch.float64, device=device)
    for j in range(0, d, _CHUNK):
        cols = slice(j, j + _CHUNK)
        for Y, at in ((C, slice(0, n)), (P, slice(n, n + m)), (U, slice(n + m, None))):
            if Y is not None:
                right[cols, at] = Y[:, cols].to(device=device, dtype=torch.float64).T
        right[cols, :n] -= G[:, cols].to(device=device, dtype=torch.float64).T
    R = right[:, :n] * (-erase_scale)
    D = _xt_times(X, B, device)
    if not (bool(torch.isfinite(R).all()) and bool(torch.isfinite(D).all())):
        raise NonFiniteError("the closed-form solve produced NaN/Inf; raise λ or lower the scales")
    PD = -(lam / preserve_scale) * B[n:] if in_m else _rows_gram(P, X, device) @ B
    low = LowRankMetrics(right=right, widths=(n, m, u), erase_scale=erase_scale,
                         Nc=lam * B[:n].T, Fp=_few_rows(PD),
                         Fu=None if U is None else _few_rows(_rows_gram(U, X, device) @ B))
    return Operator(R=R, D=D, low=low)


def solve_operator(C: torch.Tensor, G: torch.Tensor, P: torch.Tensor, lam: float, erase_scale: float,
                   preserve_scale: float, device=None, G_basis: torch.Tensor | None = None,
                   G_select: torch.Tensor | None = None, U: torch.Tensor | None = None) -> Operator:
    """One float64 solve for every layer of this text width (C, G: n × d rows; P: m × d; U: u × d).

    Two routes to the same edit and metrics (float64 data: equal to ~1e-9 relative, float32 rows to
    the float32 Grams' ~1e-6; tests/test_uce_rowspace.py): the row space (`_row_space_operator`)
    when the rows are fewer than the width, n + m + u < d (`_uses_row_space`): only r × r and d × r
    matrices, which makes Flux.2's d = 15,360 fit; else the dense route: d × d Grams accumulated
    over row chunks and one d × d Cholesky, whose memory does not grow with the rows. `G_basis` /
    `G_select` (see TextSystem) make the dense route's Cᵀ G and Gᵀ G cheap when few distinct guides;
    the row space never forms them."""
    device = device or C.device
    n, d = C.shape
    if P.shape[1] != d or G.shape != C.shape:
        raise InvalidInputError(f"text vectors disagree in width: C {tuple(C.shape)}, G {tuple(G.shape)}, P {tuple(P.shape)}")
    u = 0 if U is None else U.shape[0]
    if _uses_row_space(n, P.shape[0], u, d, lam, erase_scale, preserve_scale):
        return _row_space_operator(C, G, P, U, lam, erase_scale, preserve_scale, device)
    Gcc = _gram(C, device=device)
    Gpp = _gram(P, device=device)
    M = lam * torch.eye(d, dtype=torch.float64, device=device) + erase_scale * Gcc + preserve_scale * Gpp
    if not bool(torch.isfinite(M).all()):
        raise NonFiniteError("the text embeddings give a non-finite system (NaN/Inf); nothing was edited")
    if G_basis is not None and G_select is not None and 0 < G_basis.shape[0] <= min(_MAX_BASIS, n // 4):
        Gcg, Ggg = _factored_guide_grams(C, G_basis, G_select, device)
    else:
        Gcg = _gram(C, G, device=device)  # Cᵀ G (d × d)
        Ggg = _gram(G, device=device)
    try:
        if n < d:
            C64 = C.to(device=device, dtype=torch.float64)
            D = _spd_solve(M, C64.T)                                             # M⁻¹ Cᵀ
            R = erase_scale * (G.to(device=device, dtype=torch.float64) - C64).T  # s_e (G − C)ᵀ
            A = R @ D.T
        else:
            R = D = None
            # A = s_e (Gᵀ... ) in row form: A = s_e (G−C)ᵀ C M⁻¹ ; Aᵀ = M⁻¹ s_e Cᵀ(G − C)
            A = _spd_solve(M, erase_scale * (Gcg - Gcc)).T
    except torch.linalg.LinAlgError as e:
        raise InvalidInputError(f"the closed form is singular ({e}); raise λ (lam) above 0") from None
    if not bool(torch.isfinite(A).all()):
        raise NonFiniteError("the closed-form solve produced NaN/Inf; raise λ or lower the scales")
    # e = (I + A)c − g, so Σ e eᵀ follows from the Grams (no n × d work).
    target = Gcc - Gcg - Gcg.T + Ggg
    Guu = _gram(U, device=device) if U is not None and U.numel() else None
    low = None
    if R is not None:
        # A = R Dᵀ has rank n < d: each metric matrix is a rank-n correction, O(d²n) instead of d³
        # products that would cost more than the edit itself on a 4096-wide T5 projection
        Q = lambda X: D.T @ X @ D  # noqa: E731
        moved = lambda X: R @ Q(X) @ R.T  # noqa: E731  A X Aᵀ
        Qc = Q(Gcc)
        E = D.T @ (Gcc - Gcg)
        RE = R @ E
        residual = target + RE + RE.T + R @ Qc @ R.T
        if _LOW_RANK_LAYER_METRICS * n <= d:  # per layer out·d·(n + m + u) in float64 against one out·d² WᵀW
            f64 = lambda X: X.to(device=device, dtype=torch.float64)  # noqa: E731
            p_rows = P if P.shape[0] <= d else P[:0]
            u_rows = U if Guu is not None else P[:0]
            parts = [(C64 - f64(G)).T, f64(p_rows).T, f64(u_rows).T]
            low = LowRankMetrics(right=torch.cat(parts, dim=1), widths=tuple(x.shape[1] for x in parts),
                                 erase_scale=erase_scale,
                                 Nc=torch.eye(n, dtype=torch.float64, device=device) - erase_scale * (C64 @ D).T,
                                 Fp=_psd_root(Q(Gpp)), Fu=_psd_root(Q(Guu)) if Guu is not None else None,
                                 Gpp32=Gpp.to(torch.float32) if P.shape[0] > d else None)
    else:
        moved = lambda X: A @ X @ A.T  # noqa: E731
        B = torch.eye(d, dtype=torch.float64, device=device) + A.T
        residual = B.T @ Gcc @ B - B.T @ Gcg - Gcg.T @ B + Ggg
    return Operator(R=R, D=D, A=A, preserve_gram=Gpp, preserve_moved=moved(Gpp),
                    residual_gram=residual, target_gram=target, uncond_gram=Guu,
                    uncond_moved=None if Guu is None else moved(Guu), low=low)


def layer_change(W: torch.Tensor, op: Operator, dtype=torch.float32) -> tuple[Change, dict[str, float]]:
    """The exact Change for one weight, and its preservation / target metrics."""
    out, d = W.shape
    dev = op.device
    up = None
    lowrank = op.R is not None and op.n * (out + d) < out * d
    if op.low is not None:
        metrics, up = _low_rank_metrics(W, op, exact_up=lowrank)
    else:
        W32 = W.to(device=dev, dtype=torch.float32)
        K = (W32.T @ W32).double()  # WᵀW: every metric is ⟨WᵀW, X⟩ for a d × d X
        q = lambda X: float(torch.dot(K.reshape(-1), X.reshape(-1)).clamp_min(0))  # noqa: E731
        metrics = {"preserve_rel_change": math.sqrt(q(op.preserve_moved) / max(q(op.preserve_gram), 1e-30)),
                   "target_residual": math.sqrt(q(op.residual_gram) / max(q(op.target_gram), 1e-30))}
        if op.uncond_gram is not None:  # ‖ΔW u‖ / ‖W u‖ over the unconditional prompt's rows
            metrics["uncond_rel_change"] = math.sqrt(q(op.uncond_moved) / max(q(op.uncond_gram), 1e-30))
    if up is None and (lowrank or op.row_space):
        up = W.to(device=dev, dtype=torch.float64) @ op.R
    if lowrank:
        change = Change("lowrank", (out, d), {"up": up.to(dtype).cpu(), "down": op.D.T.to(dtype).cpu()})
    elif op.row_space:
        # ΔW = up Dᵀ, O(out·n·d) and no d × d A; in float32 like the dense route's W A below
        work = torch.float64 if W.dtype == torch.float64 else torch.float32
        change = Change("delta", (out, d), {"delta": (up.to(work) @ op.D.T.to(work)).to(dtype).cpu()})
    else:
        # float32 product of a float64-solved A: the stored delta is float32 anyway
        W32 = W.to(device=dev, dtype=torch.float32)
        change = Change("delta", (out, d), {"delta": (W32 @ op.A.to(torch.float32)).to(dtype).cpu()})
    return change, metrics


def _low_rank_metrics(W: torch.Tensor, op: Operator, exact_up: bool = False
                      ) -> tuple[dict[str, float], torch.Tensor]:
    """`layer_change`'s metrics from `op.low` (see LowRankMetrics), and up = W R: one product with
    W, the sums read back to the host together. The products run in float32 for a float32 (or
    lower) W, as the dense route's WᵀW does: twice the speed of float64 on a CPU, which keeps a
    layer's cost near the dense route's out·d² as r approaches d. `exact_up` (up is stored as the
    low-rank factor): up = W R in float64, as the stored pair has always been computed."""
    low = op.low
    work = low.work(W.dtype)
    n = low.widths[0]
    Wk = W.to(device=low.right.device, dtype=work)
    if exact_up and work != torch.float64:
        w_gap = W.to(device=low.right.device, dtype=torch.float64) @ low.right[:, :n]
        w_p, w_u = (Wk @ low.at(work).right[:, n:]).split(list(low.widths[1:]), dim=1)
        work = torch.float64
    else:
        w_gap, w_p, w_u = (Wk @ low.at(work).right).split(list(low.widths), dim=1)
    up = w_gap * -low.erase_scale  # W R, R = s_e (G − C)ᵀ
    sq = lambda X: X.double().square().sum()  # noqa: E731
    quad = lambda F: sq(up @ F.T)  # noqa: E731  ‖up Fᵀ‖² = ⟨WᵀW, R Fᵀ F Rᵀ⟩
    if low.Gpp32 is None:
        preserved = sq(w_p)  # ‖W Pᵀ‖²
    else:  # more preserve rows than d: ⟨W Gpp, W⟩
        preserved = (Wk.to(torch.float32) @ low.Gpp32).double().mul_(Wk.double()).sum()
    sums = [quad(low.at(work).Fp), preserved, sq(w_gap), sq(w_gap @ low.at(work).Nc)]
    if low.Fu is not None:
        sums += [quad(low.at(work).Fu), sq(w_u)]
    v = [max(x, 0.0) for x in torch.stack(sums).tolist()]
    metrics = {"preserve_rel_change": math.sqrt(v[0] / max(v[1], 1e-30)),
               "target_residual": math.sqrt(v[3] / max(v[2], 1e-30))}
    if low.Fu is not None:
        metrics["uncond_rel_change"] = math.sqrt(v[4] / max(v[5], 1e-30))
    return metrics, up


def _float_weight(key: str, W: torch.Tensor) -> torch.Tensor:
    """`W` as a float tensor the solve can read: a plain float8 weight's value is exactly its float32
    upcast (torch has no isfinite or matmul for float8 on every device); anything else not float
    (packed or scaled quantization) must come dequantized from the host (`comfy_host.quantized`)."""
    if W.is_floating_point() and W.element_size() == 1:
        return W.detach().to(torch.float32)
    if not W.is_floating_point():
        raise InvalidInputError(f"the model weight {key} is stored as {W.dtype}; the closed form reads float weights: "
                                "dequantize it first (the ComfyUI host does: comfy_host.quantized)")
    return W


def solve_layers(weights: Mapping[str, torch.Tensor], keys: Sequence[str], op_for, ctx: RunContext | None = None
                 ) -> tuple[dict[str, Change], dict[str, dict[str, float]]]:
    ctx = ctx or RunContext()
    changes, per_key = {}, {}
    for i, k in enumerate(keys):
        ctx.report(i, len(keys))
        W = _float_weight(k, weights[k])
        if not bool(torch.isfinite(W).all()):
            raise NonFiniteError(f"the model weight {k} has NaN/Inf; nothing was edited")
        changes[k], per_key[k] = layer_change(W, op_for(W.shape[1]))
    ctx.report(len(keys), len(keys))
    return changes, per_key


def summarise(per_key: Mapping[str, Mapping[str, float]]) -> dict:
    pres = [m["preserve_rel_change"] for m in per_key.values()]
    res = [m["target_residual"] for m in per_key.values()]
    out = {"preserve_rel_change_mean": sum(pres) / len(pres), "preserve_rel_change_max": max(pres),
           "target_residual_mean": sum(res) / len(res), "target_residual_max": max(res)}
    unc = [m["uncond_rel_change"] for m in per_key.values() if "uncond_rel_change" in m]
    if unc:
        out.update(uncond_rel_change_mean=sum(unc) / len(unc), uncond_rel_change_max=max(unc))
    return out


@torch.no_grad()
def _kk(Ws: Sequence[torch.Tensor], device) -> tuple[torch.Tensor, bool]:
    """What RECE's ‖W_l X‖² summed over layers reads, and whether it is the stacked form: the layers'
    weights stacked (N × d, float64) when their rows are fewer than d (a DiT's one text projection:
    Flux.2's 6,144 rows at d = 15,360), since ‖W_stack X‖² is that sum; else Σ_l W_lᵀ W_l (d × d,
    float64; a UNet's many K/V layers at d ≤ 4096), with ‖W_l X‖² summed = ⟨that, X Xᵀ⟩."""
    d = Ws[0].shape[1]
    if sum(W.shape[0] for W in Ws) < d:
        return torch.cat([W.to(device=device, dtype=torch.float64) for W in Ws]), True
    K = torch.zeros(d, d, dtype=torch.float64, device=device)
    for W in Ws:
        W32 = W.to(device=device, dtype=torch.float32)
        K += (W32.T @ W32).double()
    return K, False


def _through(op: Operator, Ws: torch.Tensor) -> torch.Tensor:
    """Ws (I + A) for stacked weights Ws (N × d), from the factors when the operator has them."""
    if op.R is not None:
        return Ws + (Ws @ op.R) @ op.D.T
    return Ws + Ws @ op.A


def regenerating_embeddings(op: Operator, K: torch.Tensor, C0: torch.Tensor, lam_rel: float,
                            stacked: bool = False) -> torch.Tensor:
    """RECE's closed form: per row c of C0, c' = argmin Σ_l ‖W'_l c' − W_l c‖² + λ‖c'‖², with
    W'_l = W_l (I + A): c' = (Tᵀ K T + λ I)⁻¹ Tᵀ K c, T = I + A, λ = lam_rel · tr(Tᵀ K T) / d.

    `stacked` (see `_kk`): K is the layers' weights stacked, N × d with N < d, and with F = K T the
    same c' is Fᵀ (F Fᵀ + λ I_N)⁻¹ K c: an N × N solve and no d × d matrix. Otherwise K is the d × d
    Σ WᵀW and a row-space operator's A is built (d × d) for this, as it is only when hardening."""
    d = K.shape[1]
    if stacked:
        F = _through(op, K)
        lam = lam_rel * float(F.square().sum()) / d
        lhs = F @ F.T
        lhs.diagonal().add_(lam)
        return (F.T @ _spd_solve(lhs, K @ C0.T)).T
    T = torch.eye(d, dtype=torch.float64, device=K.device) + op.A
    KT = K @ T
    lhs = T.T @ KT
    lam = lam_rel * float(torch.trace(lhs)) / d
    lhs = lhs + lam * torch.eye(d, dtype=torch.float64, device=K.device)
    return torch.linalg.solve(lhs, KT.T @ C0.T).T


def _regeneration(op: Operator, K: torch.Tensor, C1: torch.Tensor, C0: torch.Tensor, stacked: bool = False) -> float:
    """‖W' c' − W c‖ / ‖W c‖ over every layer and row: how well c' brings the original K/V back
    (K as in `regenerating_embeddings`)."""
    if stacked:
        orig = K @ C0.T
        return math.sqrt(float((_through(op, K) @ C1.T - orig).square().sum())
                         / max(float(orig.square().sum()), 1e-30))
    T = torch.eye(K.shape[0], dtype=torch.float64, device=K.device) + op.A
    E = T @ C1.T - C0.T
    return math.sqrt(float((E * (K @ E)).sum().clamp_min(0)) / max(float((C0.T * (K @ C0.T)).sum()), 1e-30))


def harden(system: TextSystem, op: Operator, Ws: Sequence[torch.Tensor], config: UCEConfig, device,
           ctx: RunContext, lam: float | None = None) -> tuple[Operator, list[dict]]:
    """`config.harden_rounds` RECE rounds: each adds, for every edited token row, the embedding that
    regenerates its original K/V through the current edit, with that row's target, and re-solves.
    With fewer weight rows than d the rounds run on the stacked weights (see `_kk`), else on the
    d × d Σ WᵀW. `lam`: the absolute λ of the first solve (`solve_lam`; default `config.lam`), kept
    for every re-solve so the added rows do not change the unit it counts in."""
    lam = config.lam if lam is None else lam
    K, stacked = _kk(Ws, device)
    C0 = system.C.to(device=device, dtype=torch.float64)
    C_all, G_all = system.C, system.G
    rounds = []
    for r in range(config.harden_rounds):
        ctx.check()
        C1 = regenerating_embeddings(op, K, C0, config.harden_lam, stacked)
        before = _regeneration(op, K, C1, C0, stacked)
        C_all = torch.cat([C_all, C1.to(device=C_all.device, dtype=C_all.dtype)])
        G_all = torch.cat([G_all, system.G])
        op = solve_operator(C_all, G_all, system.P, lam, config.erase_scale, config.preserve_scale, device,
                            U=system.U)
        rounds.append({"round": r + 1, "regeneration_before": round(before, 6),
                       "regeneration_after": round(_regeneration(op, K, C1, C0, stacked), 6),
                       "norm_ratio": round(float(C1.norm() / C0.norm().clamp_min(1e-30)), 6)})
        log.info("UCE hardening round %d: relative error of the K/V that the regenerating embeddings reach, "
                 "%.3f before and %.3f after the re-solve", r + 1, before, rounds[-1]["regeneration_after"])
    return op, rounds


def build_pooled_system(text: Text, cfg: UCEConfig, ctx: RunContext | None = None,
                        option_weights: Mapping[str, Sequence[float]] | None = None) -> TextSystem:
    """The closed form's rows for a layer that reads the pooled text vector (one per prompt): each
    concept's pooled vector is edited towards its guides' weighted pooled vectors; the preserve
    prompts' and the empty prompt's are kept."""
    ctx = ctx or RunContext()
    srcs, targets = _plan(cfg, option_weights)
    keep = preserve_prompts(cfg, srcs)
    prompts = list(dict.fromkeys(srcs + [p for t in targets for _, p in t] + keep + [""]))
    with_pooled = getattr(text, "encode_with_pooled", None)
    if with_pooled is None:
        raise InvalidInputError("this text encoder gives no pooled embedding, which this model's pooled text "
                                "projection reads: connect the CLIP that belongs to the model")
    rows = []
    for i in range(0, len(prompts), 64):
        ctx.check()
        pooled = with_pooled(prompts[i:i + 64])[1]
        if pooled is None:
            raise InvalidInputError("the CLIP returned no pooled embedding: connect the CLIP that belongs to the model")
        rows.append(pooled.detach().reshape(len(prompts[i:i + 64]), -1))
    E = torch.cat(rows).float()
    if not bool(torch.isfinite(E).all()):
        raise NonFiniteError("the text encoder returned NaN/Inf pooled embeddings; check the CLIP weights")
    index = {p: i for i, p in enumerate(prompts)}
    C = E[[index[s] for s in srcs]]
    G = torch.stack([sum(w * E[index[p]] for w, p in t) for t in targets]).to(E.dtype)
    P = E[[index[p] for p in keep + [""]]]
    return TextSystem(C=C, G=G, P=P, concept_rows=[1] * len(srcs), preserve_prompts=keep, U=E[[index[""]]])


class NormedText:
    """A text encoder whose context rows pass through `norm` (a DiT's norm in front of its text
    projection: Qwen-Image's `txt_norm`, Lumina's `cap_embedder.0`), so that the closed form solves on
    the rows the projection reads. A per-row norm commutes with picking rows, so every prompt's rows
    are exactly the model's; the pooled vector is left as it is."""

    def __init__(self, text: Text, norm: Callable[[torch.Tensor], torch.Tensor]):
        self._text, self._norm = text, norm

    def __getattr__(self, name):
        return getattr(self._text, name)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._norm(self._text.encode(prompts))

    def encode_with_pooled(self, prompts: Sequence[str]):
        cond, pooled = self._text.encode_with_pooled(prompts)
        return self._norm(cond), pooled


def _compute_uce_mmdit(text: Text, weights: Mapping[str, torch.Tensor], family: Family, config: UCEConfig,
                       ctx: RunContext, option_weights, norms: Mapping[str, Callable] | None = None
                       ) -> tuple[dict, dict, dict]:
    """UCE on a DiT's text projections: one solve for the per-token projection (the context's rows,
    windows per encoder run as on SD), one for the pooled one. ΔW only; the bias stays, and since
    every target is W·g + b the bias cancels out of W'c + b = Wg + b. A projection behind a norm
    (`TextProjection.norm`) is solved on the normed rows, with `norms[name]` the host's module."""
    adapter = family.adapter
    if adapter is not None and adapter.closed_form_note and config.edit_text_tokens:
        raise InvalidInputError(adapter.closed_form_note)
    chosen = [(src, system_fn) for src, on, system_fn in
              (("tokens", config.edit_text_tokens, build_text_system), ("pooled", config.edit_text_pooled,
                                                                        build_pooled_system)) if on]
    chosen = [(src, fn, family.projection_keys(src)) for src, fn in chosen if family.projection_keys(src)]
    if not chosen:
        raise InvalidInputError(f"nothing to edit on this {family.label}: switch on edit_text_tokens or edit_text_pooled")
    changes, per_key, info = {}, {}, {"edited_token_vectors": 0, "preserved_token_vectors": 0, "layers": 0}
    for src, fn, keys in chosen:
        missing = [k for k in keys if k not in weights]
        if missing:
            raise InvalidInputError(f"the model has no {missing[0]}; is it really {family.label}?")
        in_front = {p.norm for k in keys if (p := family.projection(k)) is not None and p.norm}
        if len(in_front) > 1:
            raise InvalidInputError(f"the {src} projections of this {family.label} read through different norms "
                                    f"{sorted(in_front)}, which one solve cannot serve")
        read = text
        if in_front:
            name = in_front.pop()
            if not norms or name not in norms:
                raise InvalidInputError(f"{keys[0]} reads the text through {name}, which the host did not give: "
                                        "run the edit through ConceptEdit's nodes or comfy_host.jobs")
            read = NormedText(text, norms[name])
        system = fn(read, config, ctx, option_weights)
        d = system.C.shape[1]
        widths = {weights[k].shape[1] for k in keys}
        if widths != {d}:
            raise InvalidInputError(f"the text encoder gives {d}-wide {src} embeddings but {keys[0]} reads "
                                    f"{sorted(widths)}: connect the CLIP that belongs to this model")
        device = ctx.device or system.C.device
        ctx.check()
        lam = solve_lam(config, system)
        info.setdefault("lam_used", {})[src] = lam
        op = solve_operator(system.C, system.G, system.P, lam["lam"], config.erase_scale, config.preserve_scale,
                            device, G_basis=system.G_basis, G_select=system.G_select, U=system.U)
        if config.harden_rounds:
            op, rounds = harden(system, op, [weights[k] for k in keys], config, device, ctx, lam["lam"])
            info.setdefault("hardening", {})[src] = rounds
        c, m = solve_layers(weights, keys, lambda _d: op, ctx)
        changes.update(c)
        per_key.update(m)
        info["edited_token_vectors"] += int(system.C.shape[0])
        info["preserved_token_vectors"] += int(system.P.shape[0])
        info["preserve_prompts"] = len(system.preserve_prompts)
        info["layers"] += len(keys)
    return changes, per_key, info


def compute_uce(text: Text, weights: Mapping[str, torch.Tensor], family: Family, config: UCEConfig,
                ctx: RunContext | None = None, option_weights: Mapping[str, Sequence[float]] | None = None,
                norms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> Edit:
    """Closed-form edit of every attn2.to_k/to_v of `family`. `weights` maps ComfyUI keys to the
    (unpatched) base weights; nothing is written to them. One solve per text width.
    `option_weights` (debias only): per concept, its weights for the guide's options in place of the
    guide's own (see `debias.py`); always solved from `weights`, never from an earlier edit. `norms`
    (a DiT whose text projection reads through a norm): module name -> that module, from the host."""
    ctx = ctx or RunContext()
    config.validate()
    if family.is_mmdit:
        if config.official != "off":
            raise InvalidInputError(f"official {config.official!r} follows UCE's Stable Diffusion script (a UNet's "
                                    f"cross-attention); {family.label} has none: set official to off")
        changes, per_key, info = _compute_uce_mmdit(text, weights, family, config, ctx, option_weights, norms)
        metrics = summarise(per_key)
        metrics.update(info)
        metrics["storage"] = "lowrank" if all(c.kind == "lowrank" for c in changes.values()) else "dense/mixed"
        return _uce_edit(family, config, changes, metrics)
    user, config = config, official_config(config)
    keys = [k for k in family.attn2_kv_keys()
            if (config.edit_keys and ".to_k." in k) or (config.edit_values and ".to_v." in k)]
    missing = [k for k in keys if k not in weights]
    if missing:
        raise InvalidInputError(f"the model has no {missing[0]} ({len(missing)} K/V weights missing); "
                                f"is it really {family.label}?")
    if config.official != "off":
        if option_weights is not None:
            raise InvalidInputError("option weights apply only to mode 'debias', which official does not follow")
        system = build_official_system(text, config, ctx)
    else:
        system = build_text_system(text, config, ctx, option_weights)
    d = system.C.shape[1]
    widths = {weights[k].shape[1] for k in keys}
    if widths != {d}:
        raise InvalidInputError(f"the text encoder gives {d}-wide embeddings but the cross-attention reads "
                                f"{sorted(widths)}: connect the CLIP that belongs to this model")
    device = ctx.device or system.C.device
    ctx.check()
    lam = solve_lam(config, system)
    op = solve_operator(system.C, system.G, system.P, lam["lam"], config.erase_scale, config.preserve_scale, device,
                        G_basis=system.G_basis, G_select=system.G_select, U=system.U)
    hardening = None
    if config.harden_rounds:
        op, hardening = harden(system, op, [weights[k] for k in keys], config, device, ctx, lam["lam"])
    changes, per_key = solve_layers(weights, keys, lambda _d: op, ctx)
    metrics = summarise(per_key)
    metrics["lam_used"] = {"tokens": lam}
    if hardening is not None:
        metrics["hardening"] = hardening
    metrics.update({"edited_token_vectors": int(system.C.shape[0]), "preserved_token_vectors": int(system.P.shape[0]),
                    "preserve_prompts": len(system.preserve_prompts), "layers": len(keys),
                    "storage": "lowrank" if all(c.kind == "lowrank" for c in changes.values()) else "dense/mixed"})
    if config.official != "off":
        metrics["official_source"] = f"rohitgandikota/unified-concept-editing {OFFICIAL_SOURCES[config.official]}"
    log.info("UCE %s: %d concepts, %d token vectors, preserve change %.3g (max %.3g), target residual %.3g",
             config.mode, len(system.concept_rows), system.C.shape[0], metrics["preserve_rel_change_mean"],
             metrics["preserve_rel_change_max"], metrics["target_residual_mean"])
    return _uce_edit(family, user, changes, metrics)


# An edit whose solve leaves more than this share of the way to its targets did not do what was asked
UNDER_REACH = 0.5


def reach_warnings(metrics: Mapping, lam: float | None = None) -> list[str]:
    """What to change when the solve reached less than half of its target on average (its
    `target_residual_mean`: ‖W'c − W g‖ / ‖W c − W g‖ over the edited rows). λ is named with what it
    was in both units (`metrics["lam_used"]`, see `solve_lam`): an absolute λ counts in the text
    embeddings' squared units, so one tuned on a text encoder whose outputs are near unit scale holds
    an encoder with smaller outputs in place. `lam`: the configured λ, for metrics without lam_used."""
    left = float(metrics.get("target_residual_mean", 0.0))
    if left <= UNDER_REACH:
        return []
    used = list((metrics.get("lam_used") or {}).values())
    if used:
        u = used[0]
        if u["lam_mode"] == "relative":
            now = f"now {u['lam_rel']:g} relative, i.e. λ {u['lam']:.3g}"
        else:
            now = (f"now {u['lam']:g} absolute, {u['lam_rel']:.3g} times the text rows' mean square "
                   f"{u['text_scale']:.3g}; lam_mode relative counts λ in that unit")
    else:
        now = f"now {lam:g}"
    return [f"the edit reached only {100 * (1 - left):.0f} % of its target (target_residual_mean {left:.2f}): "
            f"lower lam ({now}) or preserve_scale, or raise erase_scale, and compute it again"]


def _uce_edit(family: Family, config: UCEConfig, changes: dict, metrics: dict) -> Edit:
    """The Edit, its params the user's settings as given (`official` among them)."""
    warned = official_warnings(config) + reach_warnings(metrics, config.lam)
    for w in warned:
        log.warning("UCE: %s", w)
    if warned:
        metrics["warnings"] = warned
    params = asdict(config)
    params.pop("concepts")
    return Edit(method="uce", family=family.name, changes=changes, concepts=_base_concepts(config), params=params,
                metrics=metrics)

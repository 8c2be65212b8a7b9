"""ConceptPrune (Chavhan, Li, Hospedales 2024): find the FFN weights that are "skilled" at a
concept and prune them. Training-free: two sets of real generations (concept and reference
prompts), forward hooks, running sums, a per-row top-k.

Steps, named after the paper:
1. `collect_statistics`: during the denoising of each prompt (both CFG halves), the input X of
   every ``ff.net.2`` (the GEGLU output, 4d wide) is L2-normalised per token and its squared
   columns are summed per (denoising step, layer) on the device. Memory O(steps × layers × 4d).
2. `wanda_scores`: S_ij = |W_ij| · ‖X_j‖₂ (the RMS column norm, so concept and reference
   statistics made from different numbers of tokens compare fairly).
3. `skilled_mask`: per step, in every output row the top-k weights by concept score
   (k = ⌊skill_ratio · 4d⌋, at least 1) that also score higher for the concept than for the
   reference; the union over the first τ steps.
4. `compute_concept_prune`: the union over concepts, as an `Edit` of sparse masks
   (W ← W ⊙ (1 − M)).

Every calibration prompt starts from the same noise (the seed's noise for a batch of one, as the
official code seeds each generation alike), so the mask does not depend on how the prompts are
batched.

Only the first τ steps feed the mask, and a step's activations do not depend on later steps, so
by default the generations stop after τ steps: the mask is the same as with full generations
(``full_trajectory=True`` runs them to the end and keeps statistics for every step).

``official="concept-prune"`` follows the authors' code (github:ruchikachavhan/concept-prune at
72927d9a2b518caed4e5dddd8549d04b168ad5d7: wanda/wanda.py, neuron_receivers/wanda_receiver.py,
utils/base_utils.py, wanda/save_union_over_time.py) where the pack's defaults depart from it:
- calibration sampler: diffusers' StableDiffusionPipeline with SD1.x's PNDM scheduler (PLMS, 50
  steps = 51 UNet evaluations, the second timestep evaluated twice), the empty prompt as the
  negative, CFG only when the scale is above 1; "step" t of the statistics and of τ is the UNet
  evaluation index. Off: the host's sampler (ComfyUI's euler / normal), one step per evaluation.
- noise: ``torch.manual_seed(seed)`` then one float16 draw on the compute device per generation
  (off: ComfyUI's float32 CPU noise of the seed; on a CPU the two differ by float16 rounding only).
- column norm: √Σ_tokens (x_j/‖x‖)² summed over every token, both CFG halves and every prompt, with
  F.normalize's ε = 1e-12 on ‖x‖ (off: the RMS over the tokens, ε = 1e-6 on ‖x‖). The mask is the
  same whenever concept and reference saw as many tokens, as paired prompts do; the scores differ
  by √tokens.
- k = int(skill_ratio · 4d) per row, possibly 0 (off: at least 1).
Both: top-k of each row by concept score among those that beat the reference score, per step; a
weight is pruned when skilled at more than select_ratio · τ of the first τ steps (0: the union);
the union over concepts.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, replace
from typing import Mapping, Sequence

import torch

from .. import distributed
from ..arch import UNET_PREFIX, Family
from ..distributed import key_name, load_checked, save_checked
from ..edit import Change, Edit
from ..errors import InvalidInputError, NonFiniteError
from ..hooks import trace_inputs
from ..hosts import Denoiser, RunContext, Text, base_weights, cat_y, conditioning, latent_shape
from ..diffusion import plms_timesteps
from .config import METHOD, OFFICIAL_SOURCE, OFFICIAL_FAMILIES, PruneConfig, OFFICIAL_CFG, OFFICIAL_STEPS

log = logging.getLogger(__name__)


def with_preset_defaults(cfg: PruneConfig, preset: str) -> PruneConfig:
    """`cfg` with skill_ratio 0 and tau 0 ("the preset's default") replaced by the preset's values
    (`editing.prompts.defaults`: the paper's per-preset best, the tiny model's own); the default τ
    is capped at `steps`. Values the user set are kept."""
    from ..prompts import defaults
    d = defaults(preset)
    return replace(cfg, skill_ratio=cfg.skill_ratio or d["skill_ratio"],
                   tau=cfg.tau or min(d["tau"], max(cfg.steps, 1)))


# ---- 1. statistics ----------------------------------------------------------------------------
class FFNStatistics:
    """Running sums, per ``ff.net.2`` module, of the squared per-token-normalised inputs, one row
    per denoising step: ``sumsq[name][t, j] = Σ_tokens (x_j / ‖x‖)²`` and ``rows[name][t]`` the
    number of tokens summed. Buffers live where the activations are (allocated on first use).

    ``eps`` bounds ‖x‖² from below (1e-12, i.e. ‖x‖ ≥ 1e-6; official: F.normalize's 1e-12 on ‖x‖,
    1e-24 here). ``mean``: `norms` is the RMS over the tokens (True) or the official √Σ (False)."""

    def __init__(self, names: Sequence[str], steps: int, eps: float = 1e-12,
                 columns: Mapping[str, tuple[int, int]] | None = None, mean: bool = True):
        self.names = list(names)
        self.steps = steps
        self.eps = eps
        self.mean = mean
        self.step = 0
        self.sumsq: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[int]] = {n: [0] * steps for n in self.names}
        # (first, count) of the input columns that are the MLP's neurons (Flux single blocks' linear2
        # reads the attention output first); absent: every column
        self.columns = dict(columns or {})
        # batches taken from the cache and generated (`collect_statistics`, all processes together)
        self.cached = 0
        self.computed = 0

    def update(self, name: str, x: torch.Tensor) -> None:
        """Add one forward's input [..., 4d] at the current step. Runs in a hook: no host copies."""
        t = self.step
        if t >= self.steps:
            return
        cols = self.columns.get(name)
        if cols is not None:
            x = x[..., cols[0]:cols[0] + cols[1]]
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sq = x.square()
        # Σ_tokens x_j² / ‖x‖² as one mat-vec (1/‖x‖²) @ x²: no second [tokens, 4d] temporary
        # (3.4 ms -> 0.3 ms per call at 4096 x 256 on 2 CPU cores).
        contrib = sq.sum(dim=1).clamp_min(self.eps).reciprocal() @ sq
        buf = self.sumsq.get(name)
        if buf is None:
            buf = self.sumsq[name] = torch.zeros(self.steps, x.shape[1], device=x.device, dtype=torch.float32)
        buf[t] += contrib
        self.rows[name][t] += x.shape[0]  # a shape, known on the host: no device sync

    def norms(self) -> dict[str, torch.Tensor]:
        """‖X_j‖₂ per step, [steps, 4d] per layer: an RMS over the tokens seen (so concept and
        reference sets of different sizes compare fairly), or with ``mean=False`` the official
        column norm √Σ_tokens over every token of every prompt."""
        out = {}
        for n in self.names:
            if n not in self.sumsq:
                raise InvalidInputError(f"no activations reached {n}; the model did not run its FFN layers")
            if not self.mean:
                out[n] = self.sumsq[n].sqrt()
                continue
            rows = torch.tensor(self.rows[n], dtype=torch.float32, device=self.sumsq[n].device).clamp_min(1)
            out[n] = (self.sumsq[n] / rows[:, None]).sqrt()
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.sumsq.values())


class _EnoughSteps(Exception):
    """Stops a generation once the steps the statistics need have run (never leaves this module)."""


def collect_statistics(denoiser: Denoiser, modules: Mapping[str, torch.nn.Module], names: Sequence[str],
                       prompts: Sequence[str], cfg: PruneConfig, ctx: RunContext,
                       progress: tuple[int, int] | None = None,
                       columns: Mapping[str, tuple[int, int]] | None = None,
                       text: Text | None = None, cache_dir: str | None = None,
                       cache_key: Mapping | None = None) -> FFNStatistics:
    """Generate every prompt (batches of ``cfg.batch_size``, each prompt from the noise of ``cfg.seed``)
    with hooks on `names`, summing statistics for the first ``cfg.kept_steps`` steps. ``progress`` =
    (steps done before, total steps) for ctx.report across several calls. With ``cfg.official`` the
    generations are the official pipeline's (`official_generate`, through `denoiser.eps` and `text`,
    default ``denoiser.text``) and the statistics its column norms.

    Each batch's sums are kept apart and added in float64 in batch order (one batch: exactly its own
    float32 sums). With `cache_dir` each batch's sums are cached as soon as it is done, keyed by
    `cache_key` (what model and settings) and the batch's prompts, so a stopped run resumes from the
    batches it finished. Under torchrun (`editing.distributed`) the batches no rank has cached are
    split over the ranks by index and the sums all-reduced in float64: every rank gets the same statistics."""
    official = cfg.official != "off"
    if official:
        text = _official_host(denoiser, text)
    eps, mean = (OFFICIAL_NORM_EPS ** 2, False) if official else (1e-12, True)

    def fresh() -> FFNStatistics:
        return FFNStatistics(names, cfg.kept_steps, eps=eps, columns=columns, mean=mean)

    batches = [list(prompts[b:b + cfg.batch_size]) for b in range(0, len(prompts), cfg.batch_size)]
    done, total = progress or (0, len(batches) * cfg.kept_steps)
    n_world, me = distributed.world(), distributed.rank()
    keys = [dict(cache_key or {}, prompts=batch) for batch in batches]
    paths = [os.path.join(cache_dir, f"prune-stats-{key_name(k)}.safetensors") if cache_dir else None for k in keys]
    held = {}
    for c, path in enumerate(paths):
        got = load_checked(path, keys[c]) if path else None
        if got is not None:
            held[c] = got[0]
    owner = distributed.first_holders(len(batches), held)  # the lowest rank holding a batch provides it
    todo = [c for c in range(len(batches)) if owner[c] is None]
    mine = [todo[j] for j in distributed.shard_indices(len(todo))]
    cached = len(batches) - len(todo)
    state = {"done": done + cached * cfg.kept_steps, "ran": 0}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}

    def add(sumsq: Mapping[str, torch.Tensor], counts: Mapping[str, torch.Tensor]) -> None:
        """Fold one batch's sums in (float64; streamed: no batch is kept)."""
        for name, v in sumsq.items():
            if name in sums:
                sums[name] = sums[name] + v.to(sums[name].device, torch.float64)
                rows[name] = rows[name] + counts[name]
            else:
                sums[name], rows[name] = v.double(), counts[name].clone()

    for c in sorted(held):  # the cached batches this rank provides
        if owner[c] == me:
            t = held[c]
            add({k[6:]: v for k, v in t.items() if k.startswith("sumsq.")},
                {k[5:]: v.long() for k, v in t.items() if k.startswith("rows.")})
    ctx.report(min(state["done"], total), total)
    cur = [fresh()]

    def on_step(i: int) -> None:
        if i > 0:
            ctx.report(min(state["done"] + state["ran"] + i * n_world, total), total)
        if i >= cfg.kept_steps:
            raise _EnoughSteps
        cur[0].step = i

    with trace_inputs(modules, names, lambda name, x: cur[0].update(name, x)):
        for c in mine:
            ctx.check()
            batch = batches[c]
            cur[0] = fresh()
            try:
                if official:
                    official_generate(denoiser, text, batch, steps=cfg.steps, cfg=cfg.cfg, seed=cfg.seed,
                                      on_step=on_step, ctx=ctx)
                else:
                    denoiser.sample(batch, steps=cfg.steps, cfg=cfg.cfg, seed=cfg.seed, negative=cfg.negative,
                                    on_step=on_step, noise_per_prompt=True)
            except _EnoughSteps:
                pass
            st = cur[0]
            counts = {n: torch.tensor(st.rows[n], dtype=torch.int64) for n in st.sumsq}
            add(st.sumsq, counts)
            if paths[c]:
                tensors = {f"sumsq.{n}": v.float() for n, v in st.sumsq.items()}
                tensors.update({f"rows.{n}": v for n, v in counts.items()})
                save_checked(paths[c], tensors, keys[c])
            state["ran"] += cfg.kept_steps * n_world  # (the last step has no on_step after it)
            ctx.report(min(state["done"] + state["ran"], total), total)
    out = fresh()
    if distributed.active():
        width = distributed.all_reduce_max(torch.tensor([int(sums[n].shape[1]) if n in sums else 0 for n in names]))
        dev = next(iter(sums.values())).device if sums else torch.device("cpu")
        parts = [sums.get(n, torch.zeros(cfg.kept_steps, int(w), dtype=torch.float64, device=dev))
                 for n, w in zip(names, width)]
        counts = [rows.get(n, torch.zeros(cfg.kept_steps, dtype=torch.int64)) for n in names]
        summed = distributed.all_reduce_sum(parts + counts)
        sums = {n: v for n, v, w in zip(names, summed, width) if int(w) > 0}
        rows = {n: v.round().long() for n, v, w in zip(names, summed[len(names):], width) if int(w) > 0}
    for n in sums:
        out.sumsq[n] = sums[n].float()
        out.rows[n] = [int(v) for v in rows[n].cpu()]
    out.cached, out.computed = cached, int(distributed.all_reduce_sum([torch.tensor(float(len(mine)))])[0])
    return out


def statistics_key(denoiser: Denoiser, names: Sequence[str], cfg: PruneConfig, fingerprint: Mapping | None,
                   columns: Mapping[str, tuple[int, int]] | None, text: Text | None) -> dict:
    """What a batch's ConceptPrune statistics depend on besides its prompts: the model (the host's
    fingerprint and a probe of the MLP weights and of the text encoder's output), the hooked layers,
    the picture size and the calibration settings (not the concepts: a batch of prompts is the same
    work whichever concept asked for it)."""
    modules = denoiser.modules()
    h = hashlib.sha256()
    for n in names:
        w = modules[n].weight.detach()
        w = (w if w.is_floating_point() else w.float()).reshape(-1)[:65536].double()
        h.update(f"{n}:{tuple(modules[n].weight.shape)}:{float(w.abs().sum()):.9g}:{float(w.sum()):.9g}".encode())
    text = text if text is not None else getattr(denoiser, "text", None)
    if text is not None:
        with torch.no_grad():
            ctx_probe, _ = conditioning(denoiser, text, ["a photo"])
        v = ctx_probe.detach().double()
        h.update(f"text:{tuple(v.shape)}:{float(v.abs().sum()):.9g}:{float(v.sum()):.9g}".encode())
    settings = {k: getattr(cfg, k) for k in ("steps", "cfg", "seed", "negative", "official")}
    return {"what": "concept-prune-stats", "format": 1, "model": dict(fingerprint or {}), "probe": h.hexdigest()[:24],
            "names": list(names), "columns": {k: list(v) for k, v in (columns or {}).items()},
            "latent": list(latent_shape(denoiser)), "kept_steps": cfg.kept_steps, "settings": settings}


def _n_batches(n: int, cfg: PruneConfig) -> int:
    return (n + cfg.batch_size - 1) // cfg.batch_size


# ---- the official calibration generation ---------------------------------------------------------
OFFICIAL_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default ε on ‖x‖


class PLMS:
    """Pseudo linear multistep in ε (PNDM with skip_prk_steps, the sampler diffusers runs SD1.x with):
    `step(eps, t, x)` for the timesteps of `plms_timesteps`, in order, returns the next x.

    The first step is a plain one; the second evaluation, at the step it led to, replaces it by a
    step from the first x with the mean of both ε; then Adams–Bashforth of order 2, 3 and 4 over the
    ε kept (every evaluation's but the warm-up's second). The move from t to t' with ε is
    PNDM's formula (9): x' = √(ᾱ'/ᾱ) x − (ᾱ' − ᾱ) ε / (ᾱ √(1−ᾱ') + √(ᾱ (1−ᾱ) ᾱ')), with ᾱ₀ below
    t = 0 (set_alpha_to_one False)."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int):
        self.ac = alphas_cumprod.float()
        self.stride = len(self.ac) // steps
        self.kept: list[torch.Tensor] = []
        self.first: torch.Tensor | None = None
        self.count = 0

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        if self.count == 1:
            src, dst, e, x = t + self.stride, t, (eps + self.kept[-1]) / 2, self.first
            self.first = None
        else:
            self.kept = self.kept[-3:] + [eps]
            src, dst, h = t, t - self.stride, self.kept
            if self.count == 0:
                e, self.first = eps, x
            elif len(h) == 2:
                e = (3 * h[-1] - h[-2]) / 2
            elif len(h) == 3:
                e = (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12
            else:
                e = (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4]) / 24
        self.count += 1
        a = self.ac[src].to(x.device)
        a_prev = self.ac[max(dst, 0)].to(x.device)
        denom = a * (1 - a_prev).sqrt() + (a * (1 - a) * a_prev).sqrt()
        return (a_prev / a).sqrt() * x - (a_prev - a) * e / denom


def official_noise(shape: Sequence[int], seed: int, device: torch.device | str) -> torch.Tensor:
    """The starting latent of every official calibration generation: after ``torch.manual_seed(seed)``
    the pipeline draws ``randn([1, *shape])`` in float16 on its device (a CUDA draw there; on a CPU,
    the CPU draw, which is ComfyUI's float32 noise of the seed rounded to float16). Float32 out."""
    g = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn((1, *shape), generator=g, device=device, dtype=torch.float16).float()


def official_generate(host, text: Text, prompts: Sequence[str], *, steps: int, cfg: float, seed: int,
                      on_step=None, ctx: RunContext | None = None) -> torch.Tensor:
    """wanda/wanda.py's generation of each prompt: StableDiffusionPipeline's defaults (PNDM /
    `PLMS` over `plms_timesteps`, guidance when cfg > 1 with the empty prompt's embedding as the
    unconditional half, which goes first in the one UNet call per evaluation), each prompt from
    `official_noise`, through ``host.eps`` (ε for any prediction type). ``on_step(i)`` runs before
    evaluation i. Returns the final latents (the UNet's scale)."""
    ac = host.alphas_cumprod().float()
    ts = plms_timesteps(steps, len(ac))
    n = len(prompts)
    cond, y = conditioning(host, text, prompts)
    guided = cfg > 1
    if guided:
        uncond, y_uncond = conditioning(host, text, [""] * n)
        context, y_both = torch.cat([uncond, cond]), cat_y(y_uncond, y)
    x = official_noise(latent_shape(host), seed, cond.device).expand(n, *latent_shape(host)).clone()
    sampler = PLMS(ac.to(x.device), steps)
    for i, t in enumerate(ts):
        if ctx is not None:
            ctx.check()
        if on_step is not None:
            on_step(i)
        tt = torch.full((n,), t, device=x.device, dtype=torch.long)
        if guided:
            e_uncond, e_cond = host.eps(torch.cat([x, x]), torch.cat([tt, tt]), context, y=y_both).float().chunk(2)
            e = e_uncond + cfg * (e_cond - e_uncond)
        else:
            e = host.eps(x, tt, cond, y=y).float()
        x = sampler.step(e, t, x)
    return x


def _official_host(denoiser, text: Text | None) -> Text:
    """The text encoder the official generation encodes with; refuses a host it cannot run on."""
    text = text if text is not None else getattr(denoiser, "text", None)
    missing = [m for m in ("eps", "alphas_cumprod") if not hasattr(denoiser, m)]
    if missing or text is None:
        raise InvalidInputError("official='concept-prune' samples with the official PNDM pipeline through the model's "
                                f"ε-prediction and text encoder; this host lacks {', '.join(missing) or 'a text encoder'}. "
                                "Use official='off'")
    return text


# ---- 2.-3. scores and masks ----------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂ for W [d, 4d] and norms [4d] (or [T, 4d] -> [T, d, 4d])."""
    return weight.abs().float() * norms.unsqueeze(-2)


def skill_k(skill_ratio: float, width: int, at_least_one: bool = True) -> int:
    """Weights per row that may count as skilled: the official int(ratio · 4d) (a floor, 0 when
    ratio · 4d < 1); by default at least one, so a tiny ratio on a narrow layer still selects something."""
    k = math.floor(skill_ratio * width)
    return min(width, max(1, k) if at_least_one else k)


def skilled_mask(weight: torch.Tensor, concept_norms: torch.Tensor, reference_norms: torch.Tensor,
                 skill_ratio: float, tau: int, *, at_least_one: bool = True, select_ratio: float = 0.0) -> torch.Tensor:
    """Boolean [d, 4d]: weights skilled at the concept at more than ``select_ratio · τ`` of the
    first τ steps (select_ratio 0: at any of them).

    ``concept_norms``/``reference_norms`` are [steps, 4d] column norms. A weight is skilled at
    step t when it is among its row's top-k by concept score (k = `skill_k`) and its concept score
    beats its reference score. Vectorised over rows and columns; the loop is over the τ steps only."""
    d, n = weight.shape
    k = skill_k(skill_ratio, n, at_least_one)
    mask = torch.zeros(d, n, dtype=torch.bool, device=weight.device)
    if k == 0:
        return mask
    aw = weight.detach().abs().float()
    votes = torch.zeros(d, n, dtype=torch.int32, device=weight.device) if select_ratio > 0 else None
    for t in range(min(tau, concept_norms.shape[0])):
        sc = aw * concept_norms[t].to(aw.device)
        sr = aw * reference_norms[t].to(aw.device)
        top = sc.topk(k, dim=1).indices                       # [d, k]
        wins = torch.gather(sc > sr, 1, top)                  # the top-k entries that favour the concept
        if votes is None:
            mask |= torch.zeros_like(mask).scatter_(1, top, wins)
        else:
            votes.scatter_add_(1, top, wins.to(votes.dtype))
    return mask if votes is None else votes > select_ratio * tau


# ---- 4. the method -------------------------------------------------------------------------------
def neuron_columns(family: Family) -> dict[str, tuple[int, int]]:
    """Module -> (first, count) of its input columns that are MLP neurons: every column of a UNet's
    ``ff.net.2``; an MMDiT's MLPs (`Family.mlps`: Flux double blocks' img_mlp.2, the MLP part of
    single blocks' linear2, SD3's x_block.mlp.fc2) at their offsets."""
    if family.is_mmdit:
        return {m.module: (m.offset, m.inner) for m in family.mlps}
    return {b.ldm + ".ff.net.2": (0, b.ffn) for b in family.blocks if b.has_ffn}


def ffn_layers(family: Family, modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The family's MLP output modules (``ff.net.2``; an MMDiT's `mlps`), checked against the layout
    (name and shape)."""
    out = {}
    shapes = family.expected_shapes()
    names = [m.module for m in family.mlps] if family.is_mmdit else family.ffn_out_modules()
    if not names:
        raise InvalidInputError(f"this {family.label} has no MLP layer ConceptPrune knows")
    for name in names:
        mod = modules.get(name)
        key = f"{UNET_PREFIX}{name}.weight"
        if mod is None or not hasattr(mod, "weight"):
            raise InvalidInputError(f"the model has no {name}; is it really {family.label}? "
                                    "Connect the MODEL whose layout this is")
        if tuple(mod.weight.shape) != shapes[key]:
            raise InvalidInputError(f"{name} has shape {tuple(mod.weight.shape)}, {family.label} has {shapes[key]}")
        out[name] = mod
    return out


def _float_weight(denoiser: Denoiser, name: str, w: torch.Tensor) -> torch.Tensor:
    """The weight the scores read: the running module's own when it is a float tensor (float8 too:
    per-layer scales cancel in the row-wise ranking); packed blocks (GGUF), which only the host can
    decode, as the host's exact read of the unpatched weight (`hosts.base_weights`)."""
    if w.is_floating_point():
        return w
    key = f"{UNET_PREFIX}{name}.weight"
    base = base_weights(denoiser)
    if base is None or key not in base:
        raise InvalidInputError(f"{name} is stored packed ({w.dtype}) and the host gives no float read of it: "
                                "load a float or float8 checkpoint for ConceptPrune")
    return base[key].detach().to(w.device)


def official_warnings(cfg: PruneConfig, family: Family, host=None) -> list[str]:
    """What an official run does with the settings it has no place for, or keeps though the official
    scripts fix them (`host`: the denoiser, for the picture size); refuses a model the official
    procedure does not run on."""
    if family.kind != "unet":
        raise InvalidInputError(f"official='concept-prune' runs the authors' StableDiffusionPipeline procedure, which "
                                f"exists for SD-style UNets only; this {family.label} has none. Use official='off'")
    out = []
    if family.name not in OFFICIAL_FAMILIES and family.name != "tiny":
        out.append(f"official: the authors' scripts load SD1.x/SD2 pipelines only; the same procedure "
                   f"(PNDM calibration, their statistics and selection) is applied to this {family.label}")
    if cfg.negative:
        out.append(f"official: negative prompt {cfg.negative!r} ignored; the official pipeline's unconditional "
                   "half is the empty prompt")
    if (cfg.steps, cfg.cfg) != (OFFICIAL_STEPS, OFFICIAL_CFG):
        out.append(f"official: calibration at {cfg.steps} steps, CFG {cfg.cfg:g} as set; wanda/wanda.py runs the "
                   f"pipeline's defaults, {OFFICIAL_STEPS} steps and CFG {OFFICIAL_CFG:g}")
    native = getattr(family, "native_latent", None)
    size = tuple(latent_shape(host)[-2:]) if host is not None else None
    if native and size and size != (native, native):
        out.append(f"official: calibration at {8 * size[1]}×{8 * size[0]} pixels as set; the official pipeline "
                   f"generates at the model's native {8 * native}×{8 * native}")
    return out


@torch.no_grad()
def compute_concept_prune(denoiser: Denoiser, family: Family, pairs: Mapping[str, Sequence[tuple[str, str]]],
                          config: PruneConfig | None = None, ctx: RunContext | None = None,
                          fingerprint: Mapping[str, str] | None = None, text: Text | None = None,
                          cache_dir: str | None = None) -> Edit:
    """ConceptPrune for one or more concepts. ``pairs`` maps concept -> [(concept prompt,
    reference prompt), ...] (see `editing.prompts.build_pairs`). Returns an Edit of masks over
    the family's ``ff.net.2`` weights; the model itself is never changed (hooks are removed on
    return, error and Cancel). ``text``: the encoder of the official generations (default
    ``denoiser.text``; unused with ``official="off"``)."""
    cfg = config or PruneConfig()
    cfg.validate()
    ctx = ctx or RunContext()
    if not pairs or any(len(p) == 0 for p in pairs.values()):
        raise InvalidInputError("every concept needs at least one (concept prompt, reference prompt) pair")
    official = cfg.official != "off"
    warnings = official_warnings(cfg, family, denoiser) if official else []
    if official:
        text = _official_host(denoiser, text)
    t0 = time.perf_counter()
    modules = denoiser.modules()
    layers = ffn_layers(family, modules)
    names = list(layers)
    columns = neuron_columns(family)

    # Each distinct prompt set is generated once (concepts sharing a reference set share it).
    sets: list[tuple[str, ...]] = []
    for plist in pairs.values():
        for s in (tuple(c for c, _ in plist), tuple(r for _, r in plist)):
            if s not in sets:
                sets.append(s)
    total = sum(_n_batches(len(s), cfg) for s in sets) * cfg.kept_steps
    norms: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
    done, stats_bytes, cached, computed = 0, 0, 0, 0
    key = statistics_key(denoiser, names, cfg, fingerprint, columns, text) if cache_dir else None
    for s in sets:
        st = collect_statistics(denoiser, modules, names, s, cfg, ctx, progress=(done, total), columns=columns,
                                text=text, cache_dir=cache_dir, cache_key=key)
        done += _n_batches(len(s), cfg) * cfg.kept_steps
        norms[s] = st.norms()
        stats_bytes += st.nbytes()
        cached, computed = cached + st.cached, computed + st.computed
        del st

    ctx.check()
    modules = denoiser.modules()  # (re)loaded: the weights as they run
    changes: dict[str, Change] = {}
    metrics_layers: dict[str, float] = {}
    n_pruned = n_ffn = 0
    zero_k: set[int] = set()
    for name in names:
        full = _float_weight(denoiser, name, modules[name].weight.detach())
        first, count = columns.get(name, (0, full.shape[1]))
        w = full[:, first:first + count]  # the neurons' columns (all of them but in Flux's linear2)
        mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        for plist in pairs.values():
            cn = norms[tuple(c for c, _ in plist)][name]
            rn = norms[tuple(r for _, r in plist)][name]
            if not (torch.isfinite(cn).all() and torch.isfinite(rn).all()):
                raise NonFiniteError(f"non-finite activations in {name}; the model produced NaN/Inf while sampling")
            mask |= skilled_mask(w, cn, rn, cfg.skill_ratio, cfg.tau, at_least_one=not official,
                                 select_ratio=cfg.select_ratio)
        rows, cols = mask.nonzero(as_tuple=True)
        idx = (rows * full.shape[1] + cols + first).to(torch.int32).cpu()  # flat positions in the whole weight
        key = f"{UNET_PREFIX}{name}.weight"
        changes[key] = Change("mask", tuple(full.shape), {"index": idx})
        metrics_layers[key] = idx.numel() / mask.numel()
        n_pruned += idx.numel()
        n_ffn += mask.numel()
        if official and skill_k(cfg.skill_ratio, w.shape[1], at_least_one=False) == 0:
            zero_k.add(w.shape[1])
    unet_params = sum(p.numel() for p in modules[""].parameters()) if "" in modules else None
    ctx.report(total, total)
    prompts_meta = {c: [list(p) for p in plist] for c, plist in pairs.items()}
    metrics = {"pruned_fraction": metrics_layers, "pruned_weights": n_pruned,
               "pruned_fraction_ffn": n_pruned / max(n_ffn, 1),
               "pruned_fraction_unet": (n_pruned / unet_params) if unet_params else None,
               "generations": sum(len(s) for s in sets), "stats_bytes": stats_bytes,
               "batches_cached": cached, "batches_computed": computed,
               "seconds": time.perf_counter() - t0}
    if zero_k:
        warnings.append(f"official: k = int({cfg.skill_ratio:g} · 4d) is 0 on the layers {sorted(zero_k)} wide: "
                        "nothing pruned there (official='off' takes at least one weight per row)")
    if official:
        metrics["official_source"] = OFFICIAL_SOURCE
    if warnings:
        metrics["warnings"] = warnings
    log.info("ConceptPrune %s: %d weights pruned (%.3f%% of ff.net.2) in %.1fs", list(pairs), n_pruned,
             100 * metrics["pruned_fraction_ffn"], metrics["seconds"])
    return Edit(method=METHOD, family=family.name, changes=changes, concepts=list(pairs),
                params={**asdict(cfg), "prompts": prompts_meta}, fingerprint=dict(fingerprint or {}),
                metrics=metrics)


def floor_edit(edit: Edit, columns: Mapping[str, tuple[int, int]] | None = None) -> Edit:
    """The same layers as a ConceptPrune `edit`, every MLP weight pruned: the model with all its
    ``ff.net.2`` weights zeroed. Sampling it measures the floor of ConceptPrune on that model — a
    concept still drawn without any FFN weight cannot be erased by pruning FFN weights, whatever
    the selection (a diagnostic for tuning; never a product edit). ``columns`` (`neuron_columns` of
    the edit's family) keeps the inputs that are not MLP neurons: a Flux single block's ``linear2``
    reads the attention output in its first columns, which ConceptPrune never prunes."""
    if edit.method != METHOD:
        raise InvalidInputError(f"floor_edit takes a ConceptPrune edit (it names the ff.net.2 layers), got a "
                                f"{edit.method!r} edit; pass one from compute_concept_prune or the ConceptPrune node")
    columns = columns or {}
    changes = {}
    for k, c in edit.changes.items():
        rows, n = c.shape[0], math.prod(c.shape[1:])
        first, count = columns.get(k[len(UNET_PREFIX):].removesuffix(".weight"), (0, n))
        idx = (torch.arange(rows)[:, None] * n + torch.arange(first, first + count)[None]).flatten()
        changes[k] = Change("mask", c.shape, {"index": idx})
    return Edit(method=METHOD, family=edit.family, changes=changes, concepts=["<every ff.net.2 weight>"],
                params=dict(edit.params), fingerprint=dict(edit.fingerprint), metrics={"pruned_fraction_ffn": 1.0})

"""EMCID stage 1: per concept, the residual-stream target z = h + δ at the last edited layer.

δ is added (by a forward hook) to the output of the last edited text-encoder layer at the source
concept's last token, and optimised so the diffusion model predicts, from the edited source text,
the noise it predicts from the destination text — on x_t made from images of the source prompts:

  L = MSE(ε(x_t, t, τ_δ(p_src)), ε(x_t, t, τ(p_dst))) + Σ_e pw·MSE(pooled_e,δ(p_src), pooled_e(p_dst))
      + Σ_e wd·‖δ_e‖/‖h_e‖²,   Adam, ‖δ_e‖ ≤ c‖h_e‖ after every step, t ~ U[0, T),

over the text encoders e, with the family's (steps, lr, wd, pw, c) from `presets` unless set
(official: SD 200, 0.2, 5e-4, 0.01, 1.5; SDXL 100, 0.1, 8e-3, 0.005 on each encoder, 1.2).

SDXL's UNet also takes the vector conditioning y (the pooled text ‖ size embeddings): the target
uses y of the destination, the prediction y of the δ-edited source (`Denoiser.adm`), so δ is also
trained through the pooled output.

Flux's vector conditioning is CLIP-L's pooled output itself, its context T5's states; EMCID
edits T5 there by default, so δ lives in T5's stream and the pooled vector of the source stays.

SD3 reads CLIP-L ‖ CLIP-G and T5 along the tokens and takes y = the pooled L ‖ G: all three get
a δ (T5 has no pooled term), and δ on the CLIPs reaches y through their pooled outputs.

A T5 alone (Chroma, PixArt, AuraFlow, Wan) or one LLM encoder (Qwen-Image, HunyuanImage 2.1,
Z-Image, Flux.2) gives the whole context and no pooled vector: one δ, at the concept's last token
inside the chat template (the host's `first_token`), with no pooled term; the context it reaches the
model through is the host's (`Text.combine`: Flux.2's stacked layers, Qwen-Image's template rows
left out).

With several edited text encoders (SDXL, SD3) each gets its own δ, optimised jointly. Results are cached on
disk per (model fingerprint, concept, destination, parameters).

Several concepts run together (`optimise_deltas`, `EmcidConfig.stage1_batch`): one text-encoder and
two denoiser forwards per step carry every concept's rows, each concept keeping its own draws, loss
term, Adam state, clamp and step count, so the targets are the one-at-a-time ones up to rounding.
Their pictures are drawn together too (`draw_pictures`): every prompt's j-th picture starts from the
noise a batch of one gets with its seed (`noise_per_prompt`), so it is the same picture whichever
concepts share the sampler's batch.

Under `EmcidConfig.official` the text path is the official code's (`official`): each step takes one
picture per prompt, the prompts are padded to the longest of their batch with the padding masked
(the UNet reads that many context rows), the pooled term reads HF's pooled outputs, and h is the first
prompt's state, not the mean over the prompts.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import ExitStack
from dataclasses import replace
from typing import Mapping, Sequence

import torch

from .. import distributed
from ..diffusion import add_noise, objective_mse
from ..distributed import key_name, load_checked, save_checked
from ..errors import InvalidInputError
from ..hooks import trace_outputs
from ..hosts import RunContext, Text
from ..training import train_loop
from .stage2 import Prompts, concept_prompts, naming, read_keys, resolve_defaults
from .config import EmcidConfig

log = logging.getLogger(__name__)

_STAGE1_PARAMS = ("templates", "steps", "lr", "weight_decay", "pooled_weight", "max_norm", "images_per_prompt",
                  "sample_steps", "sample_cfg", "seed")
_OBJECTIVE = 2  # 2: the pooled term on every encoder's pooled output (1: the last encoder's only)
# the pack's own pictures (`draw_pictures`); 2: each prompt's noise that of a batch of one (1: one draw
# per concept, each template's noise depending on its slot). The official procedure keeps its own draw
_PICTURES = 2
_FORMAT = 2     # cache entries carry their key and a checksum (`distributed.save_checked`)


def cache_key(fingerprint: Mapping[str, str] | None, text_fp: str, src: str, dst: str, last: Mapping[str, int],
              cfg: EmcidConfig) -> str:
    """The name of one concept's stage-1 cache entry (the hash of `_entry_key`)."""
    return key_name(_entry_key(fingerprint, text_fp, src, dst, last, cfg))


def _resolved(cfg: EmcidConfig, text: Text) -> EmcidConfig:
    """`compute_emcid` resolves the family's defaults; a direct caller that left stage-1 values
    unset gets the fallback by encoder count (two: SDXL's, else SD's)."""
    if any(getattr(cfg, k) is None for k in ("steps", "lr", "weight_decay", "pooled_weight", "max_norm")):
        table = None
        if cfg.official != "off":
            from .official import official_table
            table = official_table(text.encoders)
        cfg = resolve_defaults(cfg, None, text.encoders, table=table)[0]
    return cfg


def encode(text: Text, ids: Mapping[str, torch.Tensor], masked: bool = False,
           projected: Mapping[str, bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                 dict[str, torch.Tensor | None]]:
    """(the model's context, the pooled vector it takes, every encoder's own pooled output),
    differentiable; context and pooled vector as `Text.combine` builds them (SDXL: both
    encoders' states, bigG's pooled; Flux: T5's states, CLIP-L's pooled). `masked` / `projected`:
    the official text path (`Text.forward`)."""
    if masked or projected:
        outs = {e: text.forward(e, ids[e], masked=masked, projected=(projected or {}).get(e)) for e in text.encoders}
    else:
        outs = {e: text.forward(e, ids[e]) for e in text.encoders}
    context, pooled = text.combine(outs)
    return context, pooled, {e: p for e, (_, p) in outs.items()}


def longest_prompt(text: Text, p) -> int:
    """The length of the longest prompt of the batch (BOS, its tokens, EOS): the width the official code's
    tokenizer call (padding=True) pads the batch to, the same on every encoder (SDXL concatenates the two
    encoders' rows). ComfyUI's CLIP runs 77 positions; with the padding masked as keys, its first rows
    are those of the shorter run (a causal row reads no later position)."""
    from .stage2 import _first_token
    return max(int(p.n_real[e].max()) + _first_token(text, e) + 1 for e in p.ids)


def official_text(text: Text, ids: Mapping[str, torch.Tensor], width: int):
    """`encode` as the official code runs the text encoder(s): the padding masked, HF's pooled outputs
    (`official.pooled_projected`), the context cut to the batch's longest prompt."""
    from .official import pooled_projected
    context, pooled, pooled_e = encode(text, ids, masked=True, projected=pooled_projected(text.encoders))
    return context[:, :width], pooled, pooled_e


def _unet_scale(denoiser, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Sampled latents (the VAE's scale) as x₀ of the objective (the UNet's), a fresh float tensor on
    `dev` (the sampler may return an inference tensor)."""
    if hasattr(denoiser, "latent_in"):
        x = denoiser.latent_in(x)
    return x.detach().clone().float().to(dev)


# prompts per sampler call on the CPU: past this a picture costs more there, not less (the tiny model on
# 2 cores: 32 pictures take 8-10 s in calls of 4 or 8 prompts, 11-15 s in calls of 16 or 32)
CPU_SAMPLE_PROMPTS = 8
# ⌊2³²/φ⌋, odd: j·step mod 2³² differs for every j, and for 0 < j < 10⁵ lies in [52777, 2³² − 11703],
# so it never meets the first picture's seed or the probe's (seed + 1)
_SEED_STEP = 0x9E3779B9


def picture_seed(seed: int, j: int) -> int:
    """The seed of every prompt's j-th picture: `seed` itself for the first, then steps of `_SEED_STEP`
    modulo 2³² (torch's CPU generator reads 32 bits of a seed), so no two pictures of a prompt start
    from one noise and none from the probe's (seed + 1)."""
    return int(seed) if j == 0 else (int(seed) + int(j) * _SEED_STEP) % 2**32


def draw_pictures(denoiser, each: Sequence[Prompts], cfg: EmcidConfig, dev: torch.device) -> list[torch.Tensor]:
    """Stage 1's source pictures of several concepts in few sampler calls: per concept x₀ [n_img·T, ...]
    (picture j of its T templates, j-major, as its own run lays out its rows) in the UNet's scale on `dev`.

    Picture j of every prompt starts from the noise a batch of one gets with `picture_seed(cfg.seed, j)`
    (`noise_per_prompt`), so a concept gets the pictures its own run draws whatever shares the batch. One
    call per j for all the concepts whose prompts tokenize to one width (on the CPU, whole concepts up
    to `CPU_SAMPLE_PROMPTS` prompts a call): where prompts are padded to the longest of their batch
    (contexts of their own lengths: an LLM's, some T5s') the sampler reads that padding, and concepts
    of one width are padded as their own runs pad them."""
    n_img = cfg.images_per_prompt
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, p in enumerate(each):
        groups.setdefault(tuple(int(v.shape[1]) for _, v in sorted(p.ids.items())), []).append(b)
    per_call = len(each)  # concepts per call; on a GPU the stage-1 batch size bounds it
    if dev.type == "cpu":
        per_call = max(1, CPU_SAMPLE_PROMPTS // max(len(p.text) for p in each))
    calls = [members[a:a + per_call] for members in groups.values() for a in range(0, len(members), per_call)]
    parts: list[list[torch.Tensor]] = [[] for _ in each]
    with torch.no_grad():
        for j in range(n_img):
            for members in calls:
                prompts = [t for b in members for t in each[b].text]
                x = denoiser.sample(prompts, steps=cfg.sample_steps, cfg=cfg.sample_cfg,
                                    seed=picture_seed(cfg.seed, j), noise_per_prompt=True)
                x = _unet_scale(denoiser, x, dev)
                at = 0
                for b in members:
                    k = len(each[b].text)
                    parts[b].append(x[at:at + k])
                    at += k
    return [torch.cat(p) for p in parts]


def optimise_delta(text: Text, denoiser, src: str, dst: str, last: Mapping[str, int], cfg: EmcidConfig,
                   ctx: RunContext | None = None, on_step=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Stage 1 for one concept. Returns (δ per encoder [d], h per encoder [d], stats: the loss history
    and the ε-loss on a fixed probe of timesteps before and after).

    Must run with gradients enabled (a host inside `torch.inference_mode()` wraps the call in
    ``torch.inference_mode(False), torch.enable_grad()`` and makes its weights usable for autograd)."""
    ctx = ctx or RunContext()
    cfg = _resolved(cfg, text)
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError("EMCID stage 1 needs gradients: call it under torch.inference_mode(False), torch.enable_grad()")
    official = cfg.official != "off"
    src_p = concept_prompts(text, [src], cfg.templates)
    dst_p = concept_prompts(text, [dst], cfg.templates)
    n_img = cfg.images_per_prompt
    if official:  # one picture per prompt and step, the official tokenizer's batch and pooled outputs
        from .official import destination_ids_from
        ids_src = src_p.ids
        ids_dst = {e: dst_p.ids[whose] for e, whose in destination_ids_from(text.encoders).items()}
        w_src, w_dst = longest_prompt(text, src_p), longest_prompt(text, dst_p)
        run_text = lambda ids, width: official_text(text, ids, width)  # noqa: E731
    else:
        ids_src = {e: v.repeat(n_img, 1) for e, v in src_p.ids.items()}
        ids_dst = {e: v.repeat(n_img, 1) for e, v in dst_p.ids.items()}
        w_src = w_dst = None
        run_text = lambda ids, _width: encode(text, ids)  # noqa: E731
    dev = next(denoiser.unet().parameters()).device  # where the UNet runs (the CLIP may live elsewhere)
    with torch.no_grad():
        if official:  # the official code's draw: one batch per concept, each picture's noise from its slot
            x0 = denoiser.sample(src_p.text * n_img, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed)
            x0 = _unet_scale(denoiser, x0, dev)
        else:
            x0 = draw_pictures(denoiser, [src_p], cfg, dev)[0]
        ctx_dst, pooled_dst, pooled_dst_e = run_text(ids_dst, w_dst)
    ctx_dst = ctx_dst.detach().clone().to(dev)
    pooled_dst = pooled_dst.detach().clone() if pooled_dst is not None else None
    # the pooled term of each edited encoder (an encoder left unedited has a constant pooled output)
    pooled_targets = {e: p.detach().clone().float().to(dev) for e, p in pooled_dst_e.items()
                      if p is not None and e in last}
    abar = denoiser.alphas_cumprod().detach().clone().float().to(dev)
    B = len(src_p.text) if official else x0.shape[0]  # rows per step: official, one picture per prompt
    adm = getattr(denoiser, "adm", None) or (lambda pooled, batch: None)  # SDXL: y from the pooled text
    with torch.no_grad():
        y_dst = adm(None if pooled_dst is None else pooled_dst.to(dev), B)
    y_dst = None if y_dst is None else y_dst.detach().clone()
    tdev = text.device

    h, deltas, limits = {}, {}, {}
    # h: the mean over the prompts; officially the first prompt's (compute_z's source_init)
    h_p = concept_prompts(text, [src], cfg.templates[:1]) if official else src_p
    for enc, L in last.items():
        _, H = read_keys(text, enc, h_p, None, L, None, cfg.batch)
        h[enc] = H[0].float().detach().clone()
        deltas[enc] = torch.zeros_like(h[enc], requires_grad=True)
        limits[enc] = cfg.max_norm * float(h[enc].norm())
    opt = torch.optim.Adam(list(deltas.values()), lr=cfg.lr)
    onehot = {}  # per edited encoder: 1 at the concept's last token (its own token layout)
    for enc in last:
        onehot[enc] = torch.zeros(B, ids_src[enc].shape[1], 1, device=tdev)
        onehot[enc][torch.arange(B, device=tdev), src_p.pos[enc].repeat(B // len(src_p.text)).to(tdev)] = 1.0

    def add_delta(enc):
        def fn(_name, out):
            return out + (onehot[enc].to(out.dtype) * deltas[enc].to(out.dtype))
        return fn

    def eps_loss(rows, t, noise):
        x_t = add_noise(rows, noise, t, abar)
        with torch.no_grad():
            target = denoiser.eps(x_t, t, ctx_dst, y=y_dst).detach()
        with ExitStack() as stack:
            for enc, L in last.items():
                stack.enter_context(trace_outputs(text.modules(enc), [naming(text, enc).block_module(L)],
                                                  add_delta(enc)))
            ctx_src, pooled_src, pooled_src_e = run_text(ids_src, w_src)
        y_src = None if y_dst is None else adm(pooled_src.to(dev), B)  # δ reaches SDXL's y through the pooled
        pred = denoiser.eps(x_t, t, ctx_src.to(dev), y=y_src)
        return objective_mse(denoiser, pred, target, t), pooled_src_e

    # a fixed probe (timesteps spread over the schedule, fixed noise) to report progress without the
    # sampling noise of the training loss
    gp = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    x0_probe = x0[:B]  # every picture; officially each prompt's first
    probe = [(torch.full((B,), int(tt), dtype=torch.long, device=dev), torch.randn(x0_probe.shape, generator=gp).to(dev))
             for tt in torch.linspace(50, abar.shape[0] - 50, 4)]

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(float(eps_loss(x0_probe, tt, nn)[0]) for tt, nn in probe) / len(probe)

    before = probe_loss()
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)

    h_sq = {enc: h[enc].norm() ** 2 for enc in deltas}  # constants of the weight-decay term
    terms: dict[str, float] = {}

    def step(i):
        rows = x0
        if official:  # per prompt one of its pictures (compute_z's sample_indices)
            pick = torch.randint(0, n_img, (B,), generator=g).to(dev)
            rows = x0[pick * B + torch.arange(B, device=dev)]
        t = torch.randint(0, abar.shape[0], (B,), generator=g).to(dev)
        noise = torch.randn(rows.shape, generator=g).to(dev)
        loss, pooled_src_e = eps_loss(rows, t, noise)
        terms["eps"] = float(loss.detach())
        if cfg.pooled_weight:
            for enc, target in pooled_targets.items():  # every encoder's pooled output (official SDXL: both)
                if pooled_src_e.get(enc) is not None:
                    term = cfg.pooled_weight * torch.nn.functional.mse_loss(pooled_src_e[enc].float().to(dev), target)
                    terms[f"pooled.{enc}"] = float(term.detach())
                    loss = loss + term
        for enc, d in deltas.items():
            term = (cfg.weight_decay * d.norm() / h_sq[enc]).to(dev)
            terms[f"decay.{enc}"] = float(term.detach())
            loss = loss + term
        if not bool(torch.isfinite(loss)):  # before the step: a NaN δ would poison the projection below
            return {"loss": float(loss.detach())}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # project back into the ball ‖δ‖ ≤ max_norm·‖h‖
            for enc, d in deltas.items():
                n = float(d.norm())
                if n > limits[enc]:
                    d.mul_(limits[enc] / n)
        return {"loss": float(loss.detach())}

    run = train_loop(cfg.steps, step, ctx, what=f"EMCID stage 1 for {src!r}", hint="lower lr",
                     on_step=on_step or (lambda _done: None))
    history = run.history.get("loss", [])
    stats = {"history": history, "probe_before": before, "probe_after": probe_loss(), "last_terms": dict(terms),
             "settings": {k: getattr(cfg, k) for k in ("steps", "lr", "weight_decay", "pooled_weight", "max_norm")}}
    return {e: d.detach().clone() for e, d in deltas.items()}, h, stats



# ---- several concepts at once --------------------------------------------------------------------
CPU_BATCH = 8        # concepts per batch on the CPU: past this the rows stop getting cheaper per row
MAX_BATCH = 64       # on a GPU, whatever the free memory says
_ROW_FLOOR = 256 * 2**20  # the least memory one denoiser row with its graph is assumed to take


def stage1_batch_size(cfg: EmcidConfig, denoiser, n: int) -> int:
    """How many of `n` concepts `optimise_targets` optimises together: `cfg.stage1_batch` where set;
    one under the official procedure (its stage 1 is the official code's, one concept per run, and
    that is what its differential test pins down); else
    `CPU_BATCH` on the CPU and, on a GPU, what 60 % of the free memory holds at an assumed cost per
    denoiser row of twice the UNet's weights (at least `_ROW_FLOOR`): a forward kept for the backward
    stores activations of about that size per picture on SD-sized UNets. The estimate is rough; a
    batch that runs out of memory is halved and run again (`optimise_targets`)."""
    n = max(1, int(n))
    if cfg.official != "off" or n == 1:
        return 1
    if cfg.stage1_batch:
        return max(1, min(int(cfg.stage1_batch), n))
    unet = denoiser.unet()
    dev = next(unet.parameters()).device
    if dev.type != "cuda":
        return min(n, CPU_BATCH)
    free, _ = torch.cuda.mem_get_info(dev)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    rows = len(cfg.templates) * cfg.images_per_prompt * 2  # the no-grad target forward rides along
    per_concept = rows * max(2 * weights, _ROW_FLOOR)
    return max(1, min(n, MAX_BATCH, int(0.6 * free // per_concept)))


def _width_key(text: Text, p: Prompts) -> tuple:
    """Concepts batch together when this agrees: the token width of every encoder whose contexts all
    have one length (CLIP, a T5 padded to a fixed width), where a wider batch would change what each
    prompt reads. An LLM encoder masks its padding and gives each prompt its own rows, which the
    denoiser runs per length (`ComfyDenoiser._apply`), so its widths may differ."""
    kinds = getattr(text, "kinds", {})
    return tuple(None if kinds.get(e) == "llm" else int(v.shape[1]) for e, v in sorted(p.ids.items()))


def _stack(text: Text, each: Sequence[Prompts], concepts: Sequence[str], templates, n_img: int
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ids [n·n_img·T, L], last-token index [n·n_img·T]) per encoder: concept by concept, each as its
    one-at-a-time run lays out its rows (n_img pictures of the T templates). Where an encoder's widths
    differ (LLM only, `_width_key`) the ids come from one tokenizer call over all prompts, padded as
    the host pads a batch."""
    joint = None
    ids, pos = {}, {}
    T = len(templates)
    for e in each[0].ids:
        if len({int(p.ids[e].shape[1]) for p in each}) == 1:
            rows = [(p.ids[e], p.pos[e]) for p in each]
        else:
            if joint is None:
                joint = concept_prompts(text, list(concepts), templates)
            rows = [(joint.ids[e][b * T:(b + 1) * T], joint.pos[e][b * T:(b + 1) * T]) for b in range(len(each))]
        ids[e] = torch.cat([i.repeat(n_img, 1) for i, _ in rows])
        pos[e] = torch.cat([q.repeat(n_img) for _, q in rows])
    return ids, pos


def optimise_deltas(text: Text, denoiser, pairs: Sequence[tuple[str, str]], last: Mapping[str, int],
                    cfg: EmcidConfig, ctx: RunContext | None = None, on_step=None,
                    steps: Sequence[int] | None = None) -> list[tuple[dict, dict, dict]]:
    """Stage 1 for several concepts together: `optimise_delta`'s result for each pair, computed with
    one text-encoder and two denoiser forwards per step over every concept's rows.

    Each concept keeps what its own run has: its pictures (drawn with the others' in few sampler
    calls, `draw_pictures`), timesteps and noise drawn from its own generators seeded as
    `optimise_delta` seeds them, its own δ tensors (one Adam over all of them is B Adams: Adam is per
    element and keeps its step count per tensor), its loss a separate term of the sum that is
    differentiated (so δ_b's gradient is its own loss's), its norm clamp, and its `steps` (default
    `cfg.steps` for all): a concept that has finished leaves the batch, its δ gets no gradient and Adam
    skips it. What differs is only the rounding of batched matrix products.

    The official procedure and a single concept run `optimise_delta` itself, one at a time.
    Concepts must agree on `_width_key`."""
    ctx = ctx or RunContext()
    cfg = _resolved(cfg, text)
    n = len(pairs)
    steps = [int(s) for s in steps] if steps is not None else [cfg.steps] * n
    if len(steps) != n or any(s < 1 for s in steps):
        raise InvalidInputError("stage 1 needs one step count ≥ 1 per concept")
    done_before = [0]

    def one_report():
        return lambda s: on_step(done_before[0] + s) if on_step is not None else None

    if cfg.official != "off" or n == 1:
        out = []
        for (src, dst), k in zip(pairs, steps):
            c = cfg if k == cfg.steps else replace(cfg, steps=k)
            out.append(optimise_delta(text, denoiser, src, dst, last, c, ctx, on_step=one_report()))
            done_before[0] += k
        return out
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError("EMCID stage 1 needs gradients: call it under torch.inference_mode(False), torch.enable_grad()")

    srcs, dsts = [s for s, _ in pairs], [d for _, d in pairs]
    src_each = [concept_prompts(text, [s], cfg.templates) for s in srcs]
    dst_each = [concept_prompts(text, [d], cfg.templates) for d in dsts]
    if len({_width_key(text, p) for p in src_each + dst_each}) > 1:
        raise InvalidInputError("these concepts' prompts have different token widths: optimise them in separate "
                                "batches (EmcidConfig.stage1_batch 1 runs one concept at a time)")
    n_img = cfg.images_per_prompt
    R = len(cfg.templates) * n_img  # rows per concept, in the order of its own run
    ids_src, pos_src = _stack(text, src_each, srcs, cfg.templates, n_img)
    ids_dst, _ = _stack(text, dst_each, dsts, cfg.templates, n_img)
    dev = next(denoiser.unet().parameters()).device
    tdev = text.device
    with torch.no_grad():
        x0s = draw_pictures(denoiser, src_each, cfg, dev)  # each concept's pictures as its own run draws them
        x0 = torch.cat(x0s)
        ctx_dst, pooled_dst, pooled_dst_e = encode(text, ids_dst)
    N = x0.shape[0]
    ctx_dst = ctx_dst.detach().clone().to(dev)
    pooled_dst = pooled_dst.detach().clone() if pooled_dst is not None else None
    pooled_targets = {e: p.detach().clone().float().to(dev) for e, p in pooled_dst_e.items()
                      if p is not None and e in last}
    abar = denoiser.alphas_cumprod().detach().clone().float().to(dev)
    adm = getattr(denoiser, "adm", None) or (lambda pooled, batch: None)
    with torch.no_grad():
        y_dst = adm(None if pooled_dst is None else pooled_dst.to(dev), N)
    y_dst = None if y_dst is None else y_dst.detach().clone()

    hs, deltas, limits, h_sq = [], {e: [] for e in last}, [], []
    for p in src_each:  # h as each concept's own run reads it (mean over its prompts)
        h = {}
        for enc, L in last.items():
            _, H = read_keys(text, enc, p, None, L, None, cfg.batch)
            h[enc] = H[0].float().detach().clone()
            deltas[enc].append(torch.zeros_like(h[enc], requires_grad=True))
        hs.append(h)
        limits.append({e: cfg.max_norm * float(h[e].norm()) for e in last})
        h_sq.append({e: h[e].norm() ** 2 for e in last})
    opt = torch.optim.Adam([d for enc in last for d in deltas[enc]], lr=cfg.lr)
    onehot = {}
    for enc in last:
        onehot[enc] = torch.zeros(N, ids_src[enc].shape[1], 1, device=tdev)
        onehot[enc][torch.arange(N, device=tdev), pos_src[enc].to(tdev)] = 1.0

    def rows_of(active: Sequence[int]) -> torch.Tensor:
        return torch.cat([torch.arange(b * R, (b + 1) * R) for b in active])

    def eps_losses(active, idx, x_rows, t, noise):
        """Per active concept its ε-loss, and every encoder's pooled output of the batch's rows."""
        didx = idx.to(dev)
        x_t = add_noise(x_rows, noise, t, abar)
        with torch.no_grad():
            target = denoiser.eps(x_t, t, ctx_dst[didx], y=None if y_dst is None else y_dst[didx]).detach()
        rows_delta = {enc: torch.stack([deltas[enc][b] for b in active]).repeat_interleave(R, dim=0)
                      for enc in last}
        hot = {enc: onehot[enc][idx.to(tdev)] for enc in last}

        def add_delta(enc):
            def fn(_name, out):
                return out + hot[enc].to(out.dtype) * rows_delta[enc].to(out.device, out.dtype)[:, None, :]
            return fn

        with ExitStack() as stack:
            for enc, L in last.items():
                stack.enter_context(trace_outputs(text.modules(enc), [naming(text, enc).block_module(L)],
                                                  add_delta(enc)))
            ctx_src, pooled_src, pooled_src_e = encode(text, {e: v[idx.to(v.device)] for e, v in ids_src.items()})
        y_src = None if y_dst is None else adm(pooled_src.to(dev), len(idx))
        pred = denoiser.eps(x_t, t, ctx_src.to(dev), y=y_src)
        losses = [objective_mse(denoiser, pred[j * R:(j + 1) * R], target[j * R:(j + 1) * R], t[j * R:(j + 1) * R])
                  for j in range(len(active))]
        return losses, pooled_src_e

    everyone = list(range(n))
    probes = []  # per concept its own run's probe (the same seeds), then stacked per probe timestep
    for b in everyone:
        gp = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        probes.append([torch.randn(x0s[b].shape, generator=gp).to(dev) for _ in range(4)])
    probe_t = [int(tt) for tt in torch.linspace(50, abar.shape[0] - 50, 4)]

    def probe_losses() -> list[float]:
        out = [0] * n
        idx = rows_of(everyone)
        with torch.no_grad():
            for k, tt in enumerate(probe_t):
                t = torch.full((N,), tt, dtype=torch.long, device=dev)
                losses, _ = eps_losses(everyone, idx, x0, t, torch.cat([probes[b][k] for b in everyone]))
                for b, value in zip(everyone, torch.stack([v.float() for v in losses]).tolist()):
                    out[b] = out[b] + value
        return [v / len(probe_t) for v in out]

    before = probe_losses()
    gens = [torch.Generator(device="cpu").manual_seed(cfg.seed) for _ in everyone]
    histories: list[list[float]] = [[] for _ in everyone]
    terms: list[dict[str, float]] = [{} for _ in everyone]

    def step(i):
        active = [b for b in everyone if i < steps[b]]
        ts, noises = [], []
        for b in active:  # the draws of its own run, in its order: timesteps, then noise
            ts.append(torch.randint(0, abar.shape[0], (R,), generator=gens[b]).to(dev))
            noises.append(torch.randn(x0s[b].shape, generator=gens[b]).to(dev))
        idx = rows_of(active)
        t = torch.cat(ts)
        eps_terms, pooled_src_e = eps_losses(active, idx, x0[idx.to(dev)], t, torch.cat(noises))
        total = 0
        losses, parts = [], []  # per active concept its loss and named terms, kept on the device
        for j, b in enumerate(active):
            loss = eps_terms[j]
            named = {"eps": loss}
            sl = slice(j * R, (j + 1) * R)
            if cfg.pooled_weight:
                for enc, target in pooled_targets.items():
                    if pooled_src_e.get(enc) is not None:
                        term = cfg.pooled_weight * torch.nn.functional.mse_loss(
                            pooled_src_e[enc][sl].float().to(dev), target[b * R:(b + 1) * R])
                        named[f"pooled.{enc}"] = term
                        loss = loss + term
            for enc in last:
                term = (cfg.weight_decay * deltas[enc][b].norm() / h_sq[b][enc]).to(dev)
                named[f"decay.{enc}"] = term
                loss = loss + term
            losses.append(loss)
            parts.append(named)
            total = total + loss  # a separate term per concept: δ_b's gradient is its own loss's
        # one copy to the host per step for every concept's loss and terms, not one per value
        flat = losses + [v for named in parts for v in named.values()] + [total]
        values = torch.stack([v.detach().float().reshape(()) for v in flat]).tolist()
        at = len(losses)
        for j, b in enumerate(active):
            for name in parts[j]:
                terms[b][name] = values[at]
                at += 1
            if not math.isfinite(values[j]):  # before the step, as one concept's run stops
                return {f"loss of {srcs[b]!r}": values[j]}
            histories[b].append(values[j])
        opt.zero_grad(set_to_none=True)  # finished concepts keep grad None: Adam leaves them alone
        total.backward()
        opt.step()
        with torch.no_grad():  # every encoder's norms in one copy to the host
            for enc in last:
                ds = [deltas[enc][b] for b in active]
                for b, d, norm in zip(active, ds, torch.stack([d.norm() for d in ds]).tolist()):
                    if norm > limits[b][enc]:
                        d.mul_(limits[b][enc] / norm)
        return {"loss": values[-1]}

    report = (lambda s: on_step(sum(min(s, k) for k in steps))) if on_step is not None else (lambda _s: None)
    train_loop(max(steps), step, ctx, what=f"EMCID stage 1 for {', '.join(map(repr, srcs))}", hint="lower lr",
               on_step=report)
    after = probe_losses()
    settings = {k: getattr(cfg, k) for k in ("steps", "lr", "weight_decay", "pooled_weight", "max_norm")}
    return [({e: deltas[e][b].detach().clone() for e in last}, hs[b],
             {"history": histories[b], "probe_before": before[b], "probe_after": after[b],
              "last_terms": dict(terms[b]), "settings": dict(settings, steps=steps[b])})
            for b in everyone]


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()


def _entry_key(fingerprint: Mapping[str, str] | None, text_fp: str, src: str, dst: str, last: Mapping[str, int],
               cfg: EmcidConfig) -> dict:
    """What a stage-1 target depends on: the model, the text encoder(s), the pair, the layers and the
    stage-1 settings (not how the work was scheduled: batch size, world size)."""
    params = {k: getattr(cfg, k) for k in _STAGE1_PARAMS}
    key = {"what": "emcid-stage1", "format": _FORMAT, "model": dict(fingerprint or {}), "text": text_fp, "src": src,
           "dst": dst, "last": dict(last), "params": params, "objective": _OBJECTIVE}
    if cfg.official != "off":
        params["official"] = cfg.official
    else:
        key["pictures"] = _PICTURES
    return key


def _save_entry(path: str, key: dict, res: tuple[dict, dict, dict], last: Mapping[str, int]) -> None:
    """One finished concept to the cache (atomic, checksummed: `distributed.save_checked`)."""
    deltas, h, stats = res
    tensors = {f"delta.{e}": deltas[e].float() for e in last}
    tensors.update({f"h.{e}": h[e].float() for e in last})
    save_checked(path, tensors, key, {"src": key["src"], "dst": key["dst"], "stats": json.dumps(stats)})


def _load_entry(path: str, key: dict, last: Mapping[str, int]) -> tuple[dict, dict, dict] | None:
    got = load_checked(path, key)
    if got is None:
        return None
    tensors, meta = got
    if any(f"delta.{e}" not in tensors or f"h.{e}" not in tensors for e in last):
        log.warning("cache entry %s lacks an encoder's target: refused, computing it again", path)
        return None
    return ({e: tensors[f"delta.{e}"] for e in last}, {e: tensors[f"h.{e}"] for e in last}, json.loads(meta["stats"]))


def optimise_targets(text: Text, denoiser, pairs: Sequence[tuple[str, str]], last: Mapping[str, int],
                     cfg: EmcidConfig, ctx: RunContext | None = None, cache_dir: str | None = None,
                     fingerprint: Mapping[str, str] | None = None,
                     on_concepts=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Stage 1 for every pair: targets Z per encoder [n, d] (float64) and metrics. The pairs not in the
    cache run `stage1_batch_size` at a time (`optimise_deltas`), concepts of equal token widths together.

    Each finished concept goes to the cache at once (`_save_entry`), so a run that stops (Cancel, a lost
    process) resumes from what it finished. Under torchrun (`editing.distributed`) the concepts no
    rank has cached are split over the ranks by index; each rank optimises its share, then every rank
    gets every target (exact: the rows are assembled, not averaged). A concept cached by any rank is
    taken from the lowest such rank and computed by none. `on_concepts(done, total)`: the concepts
    finished (cached ones included), before each progress report."""
    ctx = ctx or RunContext()
    cfg = _resolved(cfg, text)
    if denoiser is None:
        raise InvalidInputError("EMCID stage 1 needs the diffusion MODEL")
    from .stage2 import text_fingerprint
    text_fp = "|".join(text_fingerprint(text, e) for e in last) if cache_dir else ""
    n = len(pairs)
    total = cfg.steps * n
    me, size_w = distributed.rank(), distributed.world()
    keys: list[dict | None] = [None] * n
    paths: list[str | None] = [None] * n
    held: dict[int, tuple[dict, dict, dict]] = {}  # what this rank's cache holds
    for i, (src, dst) in enumerate(pairs):
        if cache_dir:
            keys[i] = _entry_key(fingerprint, text_fp, src, dst, last, cfg)
            paths[i] = os.path.join(cache_dir, f"stage1-{key_name(keys[i])}.safetensors")
            got = _load_entry(paths[i], keys[i], last)
            if got is not None:
                held[i] = got
    # the lowest rank that holds each concept provides it (None: nobody has it)
    owner = distributed.first_holders(n, held)
    mine_cached = {i: held[i] for i in held if owner[i] == me}
    todo = [i for i in range(n) if owner[i] is None]
    mine = [todo[j] for j in distributed.shard_indices(len(todo))]
    cached = n - len(todo)

    def report(local_done: int) -> None:  # this rank's steps, scaled to the whole run's (its share)
        done = min(cached * cfg.steps + local_done * size_w, total)
        if on_concepts is not None:
            on_concepts(min(cached + (local_done // cfg.steps) * size_w, n), n)
        ctx.report(done, total)

    report(0)
    results: dict[int, tuple[dict, dict, dict]] = dict(mine_cached)
    size = stage1_batch_size(cfg, denoiser, len(mine)) if mine else 1
    groups: dict[tuple, list[int]] = {}
    if size > 1:
        for i in mine:
            src, dst = pairs[i]
            key = (_width_key(text, concept_prompts(text, [src], cfg.templates)),
                   _width_key(text, concept_prompts(text, [dst], cfg.templates)))
            groups.setdefault(key, []).append(i)
    else:
        groups[()] = mine
    queue = [g[a:a + size] for g in groups.values() for a in range(0, len(g), size)]
    ran = [0]
    while queue:
        batch = queue.pop(0)
        try:
            out = optimise_deltas(text, denoiser, [pairs[i] for i in batch], last, cfg, ctx,
                                  on_step=lambda s: report(ran[0] + s))
        except (RuntimeError, MemoryError) as err:
            if len(batch) == 1 or not _is_oom(err):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = (len(batch) + 1) // 2
            log.warning("EMCID stage 1: %d concepts at once ran out of memory; trying %d", len(batch), half)
            queue[:0] = [batch[:half], batch[half:]]
            continue
        for i, res in zip(batch, out):
            results[i] = res
            if paths[i]:
                _save_entry(paths[i], keys[i], res, last)
        ran[0] += cfg.steps * len(batch)
        report(ran[0])
    computed = int(distributed.all_reduce_sum([torch.tensor(float(len(mine)))])[0])
    if distributed.active():
        results = _gather_results(n, results, last, text)
        if paths[0] is not None and me == 0:  # the whole set on rank 0's disk too (other machines' entries)
            for i in range(n):
                if i not in held and i not in mine:
                    _save_entry(paths[i], keys[i], results[i], last)
    ordered = [results[i] for i in range(n)]
    zs = {e: torch.stack([(h[e].double() + d[e].double()).to(text.device) for d, h, _ in ordered]) for e in last}
    metrics = {"probe_loss_before": [round(s["probe_before"], 6) for _, _, s in ordered],
               "probe_loss_after": [round(s["probe_after"], 6) for _, _, s in ordered], "cached": cached,
               "computed": computed, "stage1_batch": size}
    if size_w > 1:
        metrics["processes"] = size_w
    return zs, metrics


def _gather_results(n: int, results: Mapping[int, tuple[dict, dict, dict]], last: Mapping[str, int],
                    text: Text) -> dict[int, tuple[dict, dict, dict]]:
    """Every concept's (δ, h, stats) on every rank, each from the rank that holds it."""
    widths = torch.tensor([int(next(iter(results.values()))[1][e].numel()) if results else 0 for e in last])
    widths = distributed.all_reduce_max(widths)
    out: dict[int, tuple[dict, dict, dict]] = {i: ({}, {}, {}) for i in range(n)}
    for k, e in enumerate(last):
        like = torch.zeros(int(widths[k]))
        for slot, name in ((0, "delta"), (1, "h")):
            rows = distributed.assemble(n, {i: r[slot][e].float().cpu() for i, r in results.items()}, like=like)
            for i in range(n):
                out[i][slot][e] = rows[i].to(text.device)
    stats = distributed.assemble_bytes(n, {i: json.dumps(r[2]).encode() for i, r in results.items()})
    return {i: (d, h, json.loads(stats[i].decode())) for i, (d, h, _) in out.items()}

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
model through is the host's (`TextModel.combine`: Flux.2's stacked layers, Qwen-Image's template rows
left out).

With several edited text encoders (SDXL, SD3) each gets its own δ, optimised jointly. Results are cached on
disk per (model fingerprint, concept, destination, parameters).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack
from typing import Mapping, Sequence

import torch

from ..diffusion import add_noise, objective_mse
from ..errors import InvalidInputError
from ..hooks import trace_outputs
from ..hosts import RunContext
from ..training import train_loop
from .stage2 import EmcidConfig, TextModel, concept_prompts, naming, read_keys, resolve_defaults

log = logging.getLogger(__name__)

_STAGE1_PARAMS = ("templates", "steps", "lr", "weight_decay", "pooled_weight", "max_norm", "images_per_prompt",
                  "sample_steps", "sample_cfg", "seed")
_OBJECTIVE = 2  # 2: the pooled term on every encoder's pooled output (1: the last encoder's only)


def cache_key(fingerprint: Mapping[str, str] | None, text_fp: str, src: str, dst: str, last: Mapping[str, int],
              cfg: EmcidConfig) -> str:
    params = {k: getattr(cfg, k) for k in _STAGE1_PARAMS}
    raw = json.dumps({"model": dict(fingerprint or {}), "text": text_fp, "src": src, "dst": dst,
                      "last": dict(last), "params": params, "objective": _OBJECTIVE}, sort_keys=True, default=list)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _resolved(cfg: EmcidConfig, text: TextModel) -> EmcidConfig:
    """`compute_emcid` resolves the family's defaults; a direct caller that left stage-1 values
    unset gets the fallback by encoder count (two: SDXL's, else SD's)."""
    if any(getattr(cfg, k) is None for k in ("steps", "lr", "weight_decay", "pooled_weight", "max_norm")):
        cfg = resolve_defaults(cfg, None, text.encoders)[0]
    return cfg


def encode(text: TextModel, ids: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       dict[str, torch.Tensor | None]]:
    """(the model's context, the pooled vector it takes, every encoder's own pooled output),
    differentiable; context and pooled vector as `TextModel.combine` builds them (SDXL: both
    encoders' states, bigG's pooled; Flux: T5's states, CLIP-L's pooled)."""
    outs = {e: text.forward(e, ids[e]) for e in text.encoders}
    context, pooled = text.combine(outs)
    return context, pooled, {e: p for e, (_, p) in outs.items()}


def optimise_delta(text: TextModel, denoiser, src: str, dst: str, last: Mapping[str, int], cfg: EmcidConfig,
                   ctx: RunContext | None = None, on_step=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Stage 1 for one concept. Returns (δ per encoder [d], h per encoder [d], stats: the loss history
    and the ε-loss on a fixed probe of timesteps before and after).

    Must run with gradients enabled (a host inside `torch.inference_mode()` wraps the call in
    ``torch.inference_mode(False), torch.enable_grad()`` and makes its weights usable for autograd)."""
    ctx = ctx or RunContext()
    cfg = _resolved(cfg, text)
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError("EMCID stage 1 needs gradients: call it under torch.inference_mode(False), torch.enable_grad()")
    src_p = concept_prompts(text, [src], cfg.templates)
    dst_p = concept_prompts(text, [dst], cfg.templates)
    n_img = cfg.images_per_prompt
    with torch.no_grad():
        x0 = denoiser.sample(src_p.text * n_img, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed)
        if hasattr(denoiser, "latent_in"):  # sampled latents are in the VAE's scale, x_t in the UNet's
            x0 = denoiser.latent_in(x0)
        ctx_dst, pooled_dst, pooled_dst_e = encode(text, {e: v.repeat(n_img, 1) for e, v in dst_p.ids.items()})
    dev = next(denoiser.unet().parameters()).device  # where the UNet runs (the CLIP may live elsewhere)
    x0 = x0.detach().clone().float().to(dev)  # fresh tensor (the sampler may return an inference tensor)
    ctx_dst = ctx_dst.detach().clone().to(dev)
    pooled_dst = pooled_dst.detach().clone() if pooled_dst is not None else None
    # the pooled term of each edited encoder (an encoder left unedited has a constant pooled output)
    pooled_targets = {e: p.detach().clone().float().to(dev) for e, p in pooled_dst_e.items()
                      if p is not None and e in last}
    abar = denoiser.alphas_cumprod().detach().clone().float().to(dev)
    ids_src = {e: v.repeat(n_img, 1) for e, v in src_p.ids.items()}
    B = x0.shape[0]
    adm = getattr(denoiser, "adm", None) or (lambda pooled, batch: None)  # SDXL: y from the pooled text
    with torch.no_grad():
        y_dst = adm(None if pooled_dst is None else pooled_dst.to(dev), B)
    y_dst = None if y_dst is None else y_dst.detach().clone()
    tdev = text.device

    h, deltas, limits = {}, {}, {}
    for enc, L in last.items():
        _, H = read_keys(text, enc, src_p, None, L, None, cfg.batch)
        h[enc] = H[0].float().detach().clone()
        deltas[enc] = torch.zeros_like(h[enc], requires_grad=True)
        limits[enc] = cfg.max_norm * float(h[enc].norm())
    opt = torch.optim.Adam(list(deltas.values()), lr=cfg.lr)
    onehot = {}  # per edited encoder: 1 at the concept's last token (its own token layout)
    for enc in last:
        onehot[enc] = torch.zeros(B, ids_src[enc].shape[1], 1, device=tdev)
        onehot[enc][torch.arange(B, device=tdev), src_p.pos[enc].repeat(n_img).to(tdev)] = 1.0

    def add_delta(enc):
        def fn(_name, out):
            return out + (onehot[enc].to(out.dtype) * deltas[enc].to(out.dtype))
        return fn

    def eps_loss(t, noise):
        x_t = add_noise(x0, noise, t, abar)
        with torch.no_grad():
            target = denoiser.eps(x_t, t, ctx_dst, y=y_dst).detach()
        with ExitStack() as stack:
            for enc, L in last.items():
                stack.enter_context(trace_outputs(text.modules(enc), [naming(text, enc).block_module(L)],
                                                  add_delta(enc)))
            ctx_src, pooled_src, pooled_src_e = encode(text, ids_src)
        y_src = None if y_dst is None else adm(pooled_src.to(dev), B)  # δ reaches SDXL's y through the pooled
        pred = denoiser.eps(x_t, t, ctx_src.to(dev), y=y_src)
        return objective_mse(denoiser, pred, target, t), pooled_src_e

    # a fixed probe (timesteps spread over the schedule, fixed noise) to report progress without the
    # sampling noise of the training loss
    gp = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    probe = [(torch.full((B,), int(tt), dtype=torch.long, device=dev), torch.randn(x0.shape, generator=gp).to(dev))
             for tt in torch.linspace(50, abar.shape[0] - 50, 4)]

    def probe_loss() -> float:
        with torch.no_grad():
            return sum(float(eps_loss(tt, nn)[0]) for tt, nn in probe) / len(probe)

    before = probe_loss()
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)

    h_sq = {enc: h[enc].norm() ** 2 for enc in deltas}  # constants of the weight-decay term
    terms: dict[str, float] = {}

    def step(i):
        t = torch.randint(0, abar.shape[0], (B,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        loss, pooled_src_e = eps_loss(t, noise)
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


def optimise_targets(text: TextModel, denoiser, pairs: Sequence[tuple[str, str]], last: Mapping[str, int],
                     cfg: EmcidConfig, ctx: RunContext | None = None, cache_dir: str | None = None,
                     fingerprint: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Stage 1 for every pair: targets Z per encoder [n, d] (float64) and metrics."""
    ctx = ctx or RunContext()
    cfg = _resolved(cfg, text)
    if denoiser is None:
        raise InvalidInputError("EMCID stage 1 needs the diffusion MODEL")
    from .stage2 import text_fingerprint
    text_fp = "|".join(text_fingerprint(text, e) for e in last) if cache_dir else ""
    total = cfg.steps * len(pairs)
    zs: dict[str, list[torch.Tensor]] = {e: [] for e in last}
    first, final, cached = [], [], 0
    for i, (src, dst) in enumerate(pairs):
        path = None
        if cache_dir:
            path = os.path.join(cache_dir, f"stage1-{cache_key(fingerprint, text_fp, src, dst, last, cfg)}.safetensors")
        if path and os.path.isfile(path):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                deltas = {e: f.get_tensor(f"delta.{e}") for e in last}
                h = {e: f.get_tensor(f"h.{e}") for e in last}
                stats = json.loads(f.metadata()["stats"])
            cached += 1
        else:
            deltas, h, stats = optimise_delta(text, denoiser, src, dst, last, cfg, ctx,
                                                on_step=lambda s, i=i: ctx.report(i * cfg.steps + s, total))
            if path:
                from safetensors.torch import save_file
                os.makedirs(cache_dir, exist_ok=True)
                tensors = {f"delta.{e}": deltas[e].float().cpu().contiguous() for e in last}
                tensors.update({f"h.{e}": h[e].float().cpu().contiguous() for e in last})
                save_file(tensors, path + ".tmp", metadata={"src": src, "dst": dst, "stats": json.dumps(stats)})
                os.replace(path + ".tmp", path)
        for e in last:
            zs[e].append((h[e].double() + deltas[e].double()).to(text.device))
        first.append(round(stats["probe_before"], 6))
        final.append(round(stats["probe_after"], 6))
        ctx.report((i + 1) * cfg.steps, total)
    metrics = {"probe_loss_before": first, "probe_loss_after": final, "cached": cached}
    return {e: torch.stack(v) for e, v in zs.items()}, metrics

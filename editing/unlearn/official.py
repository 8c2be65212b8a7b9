"""The official training steps `UnlearnConfig.official` selects, each as its script takes it.

``"esd"``: Gandikota et al.'s ``train-scripts/train-esd.py`` with the ldm DDIM sampler it ships
(rohitgandikota/erasing, commit b8aeab6d4b6b613b88ad0bf219e3697c79003838; unchanged up to 6eb7dc8f,
the last commit holding it). One iteration, batch 1:
  t_enc ~ U{0, …, S−1}; t ~ U[round(1000·t_enc/S), round(1000·(t_enc+1)/S)); x_T ~ N(0, I);
  z = DDIM (η 0, guidance `esd_cfg`, timesteps 1, 1 + 1000/S, …) of the concept by the model being
  trained, from x_T until the step whose index is t_enc − 1 is done (`ldm_ddim_till`);
  loss = MSE(ε_θ(z, t, c), ε₀(z, t, ∅) − η[ε₀(z, t, c) − ε₀(z, t, ∅)]), ε₀ the frozen model; Adam.
The draws come from one generator in that order (t_enc, t, x_T).

``"rgd"``: Ko et al.'s ``SD/train-scripts/nsfw_RGD.py`` as ``SD/run-surgery.sh`` runs it (--truncate
--surgery; reds-lab/Restricted_gradient_diversity_unlearning, commit 0075ecbb74581478ee6cc0334f1e3287d3bcf1ba).
The forget and retain sets are zipped and read in order (DataLoader, shuffle off), batch after batch,
epoch after epoch; each term is the ldm loss, MSE(ε_θ(x_t, t, c), ε) with t ~ U{0, …, 999} and ε
drawn per row (forget t, forget ε, retain t, retain ε); L_f above m becomes L_f/‖L_f‖ and is still
back-propagated; g_f = −∇L̃_f, g_r = ∇L_r; each is projected off the other when their float32 cosine
is negative (`project_off`); the step is Adam on g_f' + α·g_r'.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..diffusion import add_noise, predict_x0
from ..errors import InvalidInputError
from ..hosts import RunContext, Trainable, cat_y

SOURCES = {
    "esd": "rohitgandikota/erasing train-scripts/train-esd.py (commit b8aeab6d4b6b613b88ad0bf219e3697c79003838)",
    "rgd": "reds-lab/Restricted_gradient_diversity_unlearning SD/train-scripts/nsfw_RGD.py with SD/run-surgery.sh "
           "(commit 0075ecbb74581478ee6cc0334f1e3287d3bcf1ba)",
}


# ---- ESD: the ldm DDIM sampler of train-esd.py -------------------------------------------------------
def ldm_ddim_timesteps(n_train: int, steps: int) -> torch.Tensor:
    """ldm's "uniform" DDIM timesteps: 0, c, 2c, … below n_train (c = n_train // steps), plus one."""
    if not 1 <= steps <= n_train:
        raise InvalidInputError(f"esd_ddim_steps must be between 1 and {n_train} (got {steps})")
    return torch.arange(0, n_train, n_train // steps) + 1


def ldm_ddim_till(host: Trainable, cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, ts: torch.Tensor,
                  alphas_cumprod: torch.Tensor, scale: float, till: int, *, y: torch.Tensor | None = None,
                  y_uncond: torch.Tensor | None = None, ctx: RunContext | None = None) -> torch.Tensor:
    """ldm's DDIMSampler.ddim_sampling (η 0) from x = x_T over `ts` in reverse, stopping after the step
    of index `till` − 1 (index counts down from len(ts) − 1; `till` 0 or 1 runs every step). Guidance
    batches [∅, c] as the sampler does; `scale` 1 reads the conditional prediction alone."""
    ac = alphas_cumprod.float().to(x.device)
    a = ac[ts.to(ac.device)]
    a_prev = torch.cat([ac[:1], ac[ts[:-1].to(ac.device)]])
    n = len(ts)
    for i, step in enumerate(reversed(ts.tolist())):
        if ctx is not None:
            ctx.check()
        index = n - i - 1
        tt = torch.full((x.shape[0],), int(step), device=x.device)
        if scale == 1.0:
            e = host.eps(x, tt, cond, y=y)
        else:
            eu, ec = host.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond]),
                              y=cat_y(y_uncond, y)).chunk(2)
            e = eu + scale * (ec - eu)
        x0 = predict_x0(x, e, a[index])
        x = a_prev[index].sqrt() * x0 + (1 - a_prev[index]).sqrt() * e
        if index + 1 == till:
            break
    return x


def esd_draw(g: torch.Generator, steps: int, n_train: int, shape: Sequence[int]) -> tuple[int, int, torch.Tensor]:
    """(t_enc, t, x_T) of one train-esd.py iteration, drawn from `g` in the script's order."""
    t_enc = int(torch.randint(steps, (1,), generator=g))
    lo, hi = round(t_enc / steps * n_train), round((t_enc + 1) / steps * n_train)
    t = int(torch.randint(lo, hi, (1,), generator=g))
    return t_enc, t, torch.randn((1, *shape), generator=g)


def esd_step(host: Trainable, adapters, params: list[torch.Tensor], opt: torch.optim.Optimizer, *, c: torch.Tensor,
             y: torch.Tensor | None, c_uncond: torch.Tensor, y_uncond: torch.Tensor | None, eta: float, scale: float,
             steps: int, shape: Sequence[int], g: torch.Generator, ctx: RunContext) -> Callable[[int], dict]:
    """The step of train-esd.py on the trainable part of `adapters` (c: the bare concept, one row)."""
    ac = host.alphas_cumprod().float()
    ts = ldm_ddim_timesteps(len(ac), steps)
    dev = c.device

    def step(_i):
        t_enc, t, x_T = esd_draw(g, steps, len(ac), shape)
        with torch.no_grad():  # the model being trained draws z (the script's `model`, not `model_orig`)
            z = ldm_ddim_till(host, c, c_uncond, x_T.to(dev), ts, ac, scale, t_enc, y=y, y_uncond=y_uncond, ctx=ctx)
        tt = torch.full((1,), t, device=dev)
        with torch.no_grad(), adapters.only_fixed():
            e_0 = host.eps(z, tt, c_uncond, y=y_uncond)
            e_p = host.eps(z, tt, c, y=y)
        e_n = host.eps(z, tt, c, y=y)
        loss = F.mse_loss(e_n.float(), (e_0 - eta * (e_p - e_0)).float())
        grads = _grads(loss, params)
        if ctx.average is not None:
            grads = ctx.average(grads)
        _take(opt, params, grads)
        return {"forget": round(float(loss.detach()), 6), "retain": None, "dot": 0.0}

    return step


# ---- RGD: nsfw_RGD.py ------------------------------------------------------------------------------------
def rgd_rows(step: int, n: int, batch: int) -> torch.Tensor:
    """The rows of batch `step` of an in-order DataLoader over n rows (the last batch of an epoch may be short)."""
    per_epoch = math.ceil(n / batch)
    b = step % per_epoch
    return torch.arange(b * batch, min(n, (b + 1) * batch))


def ldm_loss(host: Trainable, x0: torch.Tensor, c: torch.Tensor, y: torch.Tensor | None, g: torch.Generator,
             ac: torch.Tensor) -> torch.Tensor:
    """ldm's p_losses with the SD config (ε-target, l_simple_weight 1, logvar 0, no ELBO term): t then ε
    drawn from `g` per row, the plain MSE."""
    t = torch.randint(0, len(ac), (x0.shape[0],), generator=g).to(x0.device)
    noise = torch.randn(tuple(x0.shape), generator=g).to(x0.device)
    return F.mse_loss(host.eps(add_noise(x0, noise, t, ac), t, c, y=y).float(), noise.float())


def project_off(grad: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """nsfw_RGD.py's project_grad_onto on flat float32 vectors: grad − (⟨grad, onto⟩/‖onto‖²)·onto when
    that coefficient is negative, else grad."""
    similarity = torch.dot(grad, onto) / torch.norm(onto) ** 2
    return grad - similarity * onto if similarity.item() < 0 else grad


def rgd_step(host: Trainable, params: list[torch.Tensor], opt: torch.optim.Optimizer, data, *, alpha: float, m: float,
             batch: int, g: torch.Generator, ctx: RunContext) -> Callable[[int], dict]:
    """The step of nsfw_RGD.py (truncate, surgery) on `data` (`trainer.TrainData`): forget row i is
    paired with retain row i, its concept-free twin."""
    ac = host.alphas_cumprod().float().to(data.c_forget.device)
    n = len(data.forget_prompts)

    def pick(v, rows):
        return None if v is None else v[rows]

    def step(i):
        rows = rgd_rows(i, n, batch)
        lf = ldm_loss(host, data.x_forget[rows], data.c_forget[rows], pick(data.y_forget, rows), g, ac)
        lf_t = lf / torch.norm(lf) if lf.item() > m else lf  # "to make the loss = 1"
        g_f = [-gr for gr in _grads(lf_t, params)]
        lr_loss = ldm_loss(host, data.x_retain[rows], data.c_retain[rows], pick(data.y_retain, rows), g, ac)
        g_r = _grads(lr_loss, params)
        if ctx.average is not None:
            g_f, g_r = ctx.average(g_f), ctx.average(g_r)
        flat_f, flat_r = _flat(g_f), _flat(g_r)
        dot = float(torch.dot(flat_f, flat_r))
        f2, r2 = project_off(flat_f, flat_r), project_off(flat_r, flat_f)
        _take(opt, params, _unflat(f2 + alpha * r2, params))
        return {"forget": round(float(lf.detach()), 6), "retain": round(float(lr_loss.detach()), 6),
                "dot": round(dot, 9)}

    return step


# ---- shared ------------------------------------------------------------------------------------------------
def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if gg is None else gg for gg, p in zip(g, params)]


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in ts])


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in like]), like)]


def _take(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, gg in zip(params, grads):
        p.grad = gg
    opt.step()
    opt.zero_grad(set_to_none=True)

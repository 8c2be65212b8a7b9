"""What every prompt attack shares: soft token embeddings optimised through the (edited) text encoder
and UNet against a denoising target, their projection to real tokens, and sampling from them.

The host gives a `Text`: prompts hold a placeholder word (one token) wherever a soft vector
goes, and ``encode(prompts, soft)`` returns the UNet's context (and pooled output) with the
placeholder's token embeddings replaced by ``soft[e][j]`` (encoder e, j-th placeholder of the
prompt), differentiable in `soft`. The attacks (prefix.py, match.py, inversion.py) differ only in
the prompts they build and in the target their loss pulls the edited model's prediction towards.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..diffusion import add_noise, ddim_sample, objective_mse
from ..errors import InvalidInputError, NonFiniteError
from ..hosts import RunContext, Trainable, rows_y, Text


@dataclass
class AttackConfig:
    """Budget and settings of one prompt attack; 0 in a field means the attack's own default."""

    steps: int = 40              # optimisation steps (UnlearnDiffAtk's released configs: 40)
    tokens: int = 0              # soft tokens (prefix 5, embedding match 16, inversion 1)
    lr: float = 0.01             # Adam on the soft embeddings (UnlearnDiffAtk: 0.01)
    batch: int = 2
    images: int = 4              # concept pictures the original model generates as targets
    t_min: int = 50
    t_max: int = 950
    seed: int = 0
    time_limit_s: float = 0.0    # stop early after this many seconds (0: no limit)
    sample_steps: int = 20       # DDIM steps for the attacked pictures
    cfg: float = 7.5
    samples: int = 4             # attacked pictures per attack (and per baseline)

    def validate(self) -> "AttackConfig":
        for name in ("steps", "batch", "images", "sample_steps", "samples"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.tokens < 0 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInputError("tokens must be ≥ 0 (0 = the attack's default) and lr > 0")
        if not 0 <= self.t_min <= self.t_max <= 999:
            raise InvalidInputError(f"need 0 ≤ t_min ≤ t_max ≤ 999 (got {self.t_min}, {self.t_max})")
        return self


@dataclass
class SoftPrompt:
    """An attack's result before it is judged: the prompts it attacks with and their soft vectors."""

    attack: str
    prompts: list[str]             # with placeholders where the soft vectors go
    soft: list[torch.Tensor]       # per encoder [k, d_e]
    projected: list[str]           # the same prompts with the nearest real tokens in the placeholders' place
    losses: list[float]
    seconds: float
    steps_run: int


def placeholders(text: Text, k: int) -> str:
    return " ".join([text.placeholder] * k)


def initial_soft(text: Text, k: int, seed: int) -> list[torch.Tensor]:
    """k embeddings of random real tokens (UnlearnDiffAtk starts from random tokens), per encoder."""
    vocab = text.vocabulary()
    g = torch.Generator().manual_seed(seed)
    banned = set(getattr(text, "excluded_tokens", None) or [])
    n = min(v.shape[0] for v in vocab) - (0 if banned else 2)  # not BOS/EOS (CLIP's last two)
    allowed = torch.tensor([i for i in range(n) if i not in banned])
    ids = allowed[torch.randint(0, allowed.numel(), (k,), generator=g)]
    return [v[ids.to(v.device)].detach().float().clone() for v in vocab]


def nearest_tokens(text: Text, soft: Sequence[torch.Tensor]) -> list[int]:
    """Per soft slot the real token whose embedding is closest in cosine, summed over encoders (one
    vocabulary: SDXL's two encoders share the tokenizer)."""
    score = None
    for v, s in zip(text.vocabulary(), soft):
        vn = torch.nn.functional.normalize(v.detach().float(), dim=1)
        sn = torch.nn.functional.normalize(s.detach().float().to(vn.device), dim=1)
        part = (sn @ vn.T).cpu()
        score = part if score is None else score + part
    banned = getattr(text, "excluded_tokens", None)
    if banned:
        score[:, torch.tensor(list(banned))] = -math.inf
    else:
        score[:, -2:] = -math.inf  # never BOS/EOS
    return score.argmax(1).tolist()


def project(text: Text, prompts: Sequence[str], soft: Sequence[torch.Tensor]) -> list[str]:
    """The prompts with each placeholder replaced by its nearest real token, decoded one by one (so a
    word piece stays in its own slot: what a user would type to reproduce the attack)."""
    words = [text.decode([i]).strip() or "," for i in nearest_tokens(text, soft)]
    out = []
    for p in prompts:
        parts = p.split(text.placeholder)
        k = len(parts) - 1
        ws = (words + [""] * k)[:k]
        out.append("".join(a + w for a, w in zip(parts, ws + [""])).strip())
    return out


Target = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Eps = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Setup:
    """What an attack runs on: the host (its ᾱ and `adm`), the text the attacker prompts (the edited
    CLIP's for a text-encoder edit), the original text, ε of the edited and of the original model,
    the concept prompts and the original model's pictures of them (row i from prompt i mod n)."""

    host: Trainable
    text: Text
    original_text: Text
    edited_eps: Eps
    original_eps: Eps
    concept_prompts: list[str]
    x0: torch.Tensor
    config: AttackConfig
    ctx: RunContext


def optimise(s: Setup, prompts: Sequence[str], soft: list[torch.Tensor], target: Target, attack: str) -> SoftPrompt:
    """Adam on `soft` minimising E ‖ε_edited(x_t, t, τ(prompt, soft)) − target(x_t, t, ε, row)‖²
    over the concept pictures x0 (picture row r is prompted with prompts[r mod len(prompts)]).
    `target(xt, t, eps, rows)`: ε itself (the picture's noise) or the original model's prediction."""
    host, text, edited_eps, x0, config, ctx = s.host, s.text, s.edited_eps, s.x0, s.config, s.ctx
    params = [s.detach().clone().requires_grad_(True) for s in soft]
    opt = torch.optim.Adam(params, lr=config.lr)
    ac = host.alphas_cumprod().float()
    g = torch.Generator().manual_seed(config.seed + 1)
    losses: list[float] = []
    t0 = time.perf_counter()
    n = x0.shape[0]
    steps_run = 0
    for step in range(config.steps):
        ctx.check()
        if config.time_limit_s and time.perf_counter() - t0 > config.time_limit_s:
            break
        rows = torch.randint(0, n, (config.batch,), generator=g)
        t = torch.randint(config.t_min, config.t_max + 1, (config.batch,), generator=g)
        eps = torch.randn((config.batch, *x0.shape[1:]), generator=g)
        xb = x0[rows]
        dev = xb.device
        eps, t = eps.to(dev), t.to(dev)
        xt = add_noise(xb, eps, t, ac.to(dev))
        want = target(xt, t, eps, rows).detach()
        context, pooled = text.encode_soft([prompts[int(r) % len(prompts)] for r in rows], params)
        y = host.adm(pooled, config.batch) if hasattr(host, "adm") else None
        pred = edited_eps(xt, t, context.to(dev), y)
        loss = objective_mse(host, pred, want, t)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the {attack} attack's loss became NaN/Inf at step {step}; lower its lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        steps_run += 1
        ctx.report(step + 1, config.steps)
    found = [p.detach() for p in params]
    return SoftPrompt(attack, list(prompts), found, project(text, prompts, found), losses,
                      round(time.perf_counter() - t0, 2), steps_run)


def sample_soft(host: Trainable, text: Text, eps_fn: Eps, prompts: Sequence[str],
                soft: Sequence[torch.Tensor] | None, config: AttackConfig, ctx: RunContext,
                shape: tuple[int, ...], n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """`n` (default `config.samples`) pictures (x0, UNet latent scale) of the prompts, cycled, by DDIM
    through `eps_fn` (the edited or the original model), seed `config.seed + 7` unless given."""
    n = n or config.samples
    rows = [prompts[i % len(prompts)] for i in range(n)]
    with torch.no_grad():
        cond, pooled = text.encode_soft(rows, soft)
        uncond, pooled_u = text.encode_soft([""], None)
        y = host.adm(pooled, n) if hasattr(host, "adm") else None
        y_u = host.adm(pooled_u, 1) if hasattr(host, "adm") else None

        class _Via:  # ddim_sample calls host.eps: route it through eps_fn
            guidance_distilled = getattr(host, "guidance_distilled", False)

            def alphas_cumprod(self):
                return host.alphas_cumprod()

            def eps(self, x, t, c, y=None):
                return eps_fn(x, t, c, y)

        return ddim_sample(_Via(), cond, uncond.expand(n, *uncond.shape[1:]), steps=config.sample_steps,
                           cfg=config.cfg, seed=config.seed + 7 if seed is None else seed, shape=(n, *shape), ctx=ctx,
                           y=y, y_uncond=rows_y(y_u, n))

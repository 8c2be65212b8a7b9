"""Unlearning by fine-tuning: restricted gradient descent (Ko et al. 2024, "RGD"), plain gradient
ascent (GA) and ESD negative guidance (Gandikota et al. 2023).

RGD and GA: each step draws a forget batch (templated prompts with the concept, images the original
model generated from them) and a retain batch: by default the forget rows' own twins (the same
prompts with the concept word removed, as Ko et al. zip their forget and retain sets), plus some of
the user's retain prompts. ESD (and RGD-esd) follows Gandikota et al.'s code: x_t is fresh noise
partially denoised by the frozen model with the concept prompt (DDIM, guidance 3) to a random step,
and c is the bare concept. Losses are ε-MSE at that x_t (`Trainable.eps` is ε for v-prediction
models too), with SDXL's vector conditioning y carried alongside each text context:
- RGD-ascent: g_f = −∇L̃_f with Ko et al.'s truncation L̃_f = L_f / ‖L_f‖ once L_f > m: a constant 1,
  so a batch whose forget loss is already above m adds no forget gradient at all;
- GA (the baseline of Ko et al.'s code): the gradient of −L_f + w·L_r, w = ``ga_retain_weight``
  (0.1), no truncation and no projection;
- ESD (and RGD-esd): g_f = ∇ MSE(ε_θ(x_t, c), ε₀(x_t, ∅) − η[ε₀(x_t, c) − ε₀(x_t, ∅)]), ε₀ frozen;
- RGD: g_r = ∇L_r; if ⟨g_f, g_r⟩ < 0 each is projected off the other; the step is g_f' + α g_r'.
The model itself is never written: the trainable part is a LoRA (default) or dense ΔW on a parameter
set (ESD-x: cross-attention; ESD-u: the rest; `PRESETS`) attached by hooks (`editing.training`),
folded into an Edit.

``official`` "esd" / "rgd" runs the step of Gandikota et al.'s train-esd.py / Ko et al.'s nsfw_RGD.py
instead (`editing.unlearn.official`), with a dense ΔW on the parameter set's layers.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch

from .. import distributed, worlds
from ..diffusion import add_noise, ddim_sample, ddim_timesteps, diffusion_mse, generate_latents, objective_mse
from ..edit import Edit
from ..errors import InvalidInputError
from ..hosts import RunContext, Text, Trainable, cat_y, conditioning, latent_shape, rows_y
from ..safety import minor_in_sexual_context, refuse_unsafe
from ..arch import TINY_WORLD_FAMILIES
from ..training import Adapters, frozen_session, select_targets, train_loop
from . import official as O
from .official import _grads, _take  # one gradient/step helper for the pack's and the official steps
from .config import UnlearnConfig

log = logging.getLogger(__name__)


# Gandikota et al.'s two variants as named settings (rohitgandikota/erasing, esd_sd.py for SD1.4: 200
# iterations at Adam 5e-5, η as our default): ESD on a dense ΔW of the cross-attention (ESD-x, for
# concepts named in the prompt: styles, objects) or of everything but it (ESD-u, for concepts that
# show without being named, such as nudity).
PRESETS: dict[str, dict] = {
    "esd-x": {"method": "esd", "param_set": "xattn", "steps": 200, "lr": 5e-5},
    "esd-u": {"method": "esd", "param_set": "noxattn", "steps": 200, "lr": 5e-5},
}


def preset_config(preset: str = "custom", **settings) -> UnlearnConfig:
    """``UnlearnConfig(**settings)`` with the method, parameter set, steps and lr of `preset` in place
    of those given ("custom": the settings as they are)."""
    if preset == "custom":
        return UnlearnConfig(**settings)
    if preset not in PRESETS:
        raise InvalidInputError(f"preset must be custom or one of {', '.join(PRESETS)}, not {preset!r}")
    return UnlearnConfig(**{**settings, **PRESETS[preset]})


# What each official script fixes that the pack leaves to a setting: name -> ({official: value}, why);
# value None: the setting has no use there (it is left as it is and ignored).
_OFFICIAL_FIXED: dict[str, tuple[dict, str]] = {
    "batch": ({"esd": 1}, "train-esd.py draws one image per iteration"),
    "esd_xt": ({"esd": "sampled"}, "train-esd.py always trains on its own partial DDIM samples"),
    "esd_prompt": ({"esd": "concept"}, "train-esd.py conditions on the concept itself"),
    "t_min": ({"esd": 0, "rgd": 0}, "the script draws timesteps over the whole schedule"),
    "t_max": ({"esd": 999, "rgd": 999}, "the script draws timesteps over the whole schedule"),
    "retain_pairing": ({"rgd": "twins"}, "nsfw_RGD.py zips each forget prompt with its concept-free twin"),
    "rank": ({"esd": None, "rgd": None}, "the script fine-tunes the weights themselves (a full-rank change, no LoRA "
                                         "rank)"),
}


def official_config(cfg: UnlearnConfig) -> UnlearnConfig:
    """The settings a run under `cfg.official` reads (the script's fixed choices in place of the pack's)."""
    if cfg.official == "off":
        return cfg
    return replace(cfg, **{name: fixed[cfg.official] for name, (fixed, _) in _OFFICIAL_FIXED.items()
                           if fixed.get(cfg.official) is not None})


def official_warnings(cfg: UnlearnConfig, retain_prompts: Sequence[str] = ()) -> list[str]:
    """One line per setting the user changed from its default that `cfg.official` ignores, and for a
    parameter set that is not one of the script's own."""
    if cfg.official == "off":
        return []
    out, defaults = [], UnlearnConfig()
    for name, (fixed, why) in _OFFICIAL_FIXED.items():
        value = getattr(cfg, name)
        if cfg.official in fixed and value != getattr(defaults, name) and value != fixed[cfg.official]:
            out.append(f"official {cfg.official} ignores {name}={value!r}: {why}")
    if cfg.official == "rgd" and any(p.strip() for p in retain_prompts):
        out.append("official rgd ignores the extra retain prompts: nsfw_RGD.py's retain set is the forget "
                   "prompts' concept-free twins, zipped with them")
    if cfg.official == "esd" and cfg.param_set not in ("xattn", "noxattn"):
        out.append(f"train-esd.py trains ESD-x (param_set xattn) or ESD-u (noxattn); {cfg.param_set!r} is no "
                   "train_method of it, its layers are fine-tuned in full")
    if cfg.official == "rgd" and cfg.param_set != "xattn":
        out.append(f"run-surgery.sh fine-tunes every UNet parameter ('full'), nsfw_RGD.py's other choice is xattn; "
                   f"{cfg.param_set!r} is neither, its layers' weights are fine-tuned in full")
    return out


# ---- prompts ---------------------------------------------------------------------------------
# Generic templates in the spirit of Ko et al.'s "A {emotion} {concept} person {action} {place}".
EMOTIONS = ("happy", "calm", "serious", "smiling", "tired", "curious")
ACTIONS = ("standing", "sitting", "walking", "reading", "looking away", "waving")
PLACES = ("in a park", "on a beach", "in a kitchen", "in a city street", "in a forest", "in a studio")
GENERIC_TEMPLATES = ("a {emotion} {concept} person {action} {place}", "a photo of a {emotion} {concept} person {place}",
                     "a painting of a {concept} person {action} {place}", "{concept} person, {emotion}, {place}")


def _clean(text: str) -> str:
    text = " ".join(text.replace(" ,", ",").split())
    return text.replace(", ,", ",").strip(" ,")


def paired_prompts(concept: str, n: int, seed: int = 0, family: str = "") -> tuple[list[str], list[str]]:
    """`n` forget prompts naming `concept` and `n` retain prompts, each the same prompt without the
    concept word. On the tiny model the templates come from its world (shape / colour / style)."""
    if not concept.strip():
        raise InvalidInputError("give the concept to erase (a word or short phrase)")
    refuse_unsafe([concept], what="concept")
    rng = random.Random(f"{concept}:{seed}")
    if family in TINY_WORLD_FAMILIES:
        tiny = _tiny_pairs(concept.strip(), n, rng)
        if tiny is not None:
            return tiny
    forget, retain = [], []
    for i in range(n):
        tpl = GENERIC_TEMPLATES[i % len(GENERIC_TEMPLATES)]
        kw = dict(emotion=rng.choice(EMOTIONS), action=rng.choice(ACTIONS), place=rng.choice(PLACES))
        f, r = _clean(tpl.format(concept=concept, **kw)), _clean(tpl.format(concept="", **kw))
        if not (minor_in_sexual_context(f, concept) or minor_in_sexual_context(r, concept)):
            forget.append(f)
            retain.append(r)
    return forget, retain


def tiny_pair_attributes(concept: str, n: int) -> list[dict[str, str]] | None:
    """The attributes of the `n` tiny-world forget prompts `paired_prompts(concept, n, family="tiny")`
    builds ({"colour", "shape", "style"}; the retain twin is the same with `concept` unnamed), or
    None when `concept` is not a tiny-world concept."""
    world = worlds.get("tiny")
    try:
        kind = world.kind_of(concept)
    except KeyError:
        return None
    out = []
    for i in range(n):
        attrs = {"colour": world.COLOURS[i % len(world.COLOURS)],
                 "shape": world.SHAPES[(i * 5 + 1) % len(world.SHAPES)],
                 "style": world.STYLES[(i * 7 + 2) % len(world.STYLES)]}
        attrs[kind] = concept
        out.append(attrs)
    return out


def _tiny_pairs(concept: str, n: int, rng: random.Random):
    world = worlds.get("tiny")
    attributes = tiny_pair_attributes(concept, n)
    if attributes is None:
        return None
    kind = world.kind_of(concept)
    forget, retain = [], []
    for attrs in attributes:
        other = dict(attrs)
        # "concept word removed": an unnamed shape reads "shape"/"object", an unnamed colour or
        # artist is left out (the world's own convention for captions that omit an attribute).
        other[kind] = None
        forget.append(_tiny_caption(attrs, rng, world))
        retain.append(_tiny_caption(other, random.Random(forget[-1]), world, same_as=forget[-1]))
    return forget, retain


def _tiny_caption(attrs, rng, world, same_as: str | None = None) -> str:
    rng = random.Random(same_as) if same_as else rng
    c = world.words(attrs["colour"])[0] if attrs["colour"] else ""
    s = world.words(attrs["shape"])[0] if attrs["shape"] else rng.choice(("shape", "object"))
    a = world.words(attrs["style"])[0] if attrs["style"] and world.words(attrs["style"]) else ""
    lead = rng.choice(("a", "a picture of a", "an image of a", "a drawing of a"))
    return _clean(f"{lead} {c} {s}" + (f" in the style of {a}" if a else ""))


# ---- the objectives ----------------------------------------------------------------------------
def truncate_forget_loss(loss: torch.Tensor, m: float) -> torch.Tensor:
    """Ko et al.'s truncation: a forget loss above m becomes L_f / ‖L_f‖ = 1. That is a constant, so
    its gradient is exactly zero: ascent stops on a batch whose concept is already destroyed instead
    of running away (scaling by a detached L_f would keep ascending at 1/L_f)."""
    if float(loss.detach()) > m:
        return loss / torch.linalg.vector_norm(loss)
    return loss


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def restricted_gradients(g_f: Sequence[torch.Tensor], g_r: Sequence[torch.Tensor]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """The RGD projection over all trainable tensors as one vector. Returns (g_f', g_r', ⟨g_f, g_r⟩).

    If ⟨g_f, g_r⟩ < 0: g_f' = g_f − (⟨g_f,g_r⟩/‖g_r‖²) g_r and g_r' = g_r − (⟨g_r,g_f⟩/‖g_f‖²) g_f,
    so neither step undoes the other's first-order progress; otherwise both are unchanged."""
    dot = _dot(g_f, g_r)
    if float(dot) >= 0:
        return list(g_f), list(g_r), float(dot)
    nf, nr = _dot(g_f, g_f), _dot(g_r, g_r)
    cf = (dot / nr).float() if float(nr) > 0 else torch.tensor(0.0)
    cr = (dot / nf).float() if float(nf) > 0 else torch.tensor(0.0)
    f2 = [f - cf.to(f.device) * r for f, r in zip(g_f, g_r)]
    r2 = [r - cr.to(r.device) * f for f, r in zip(g_f, g_r)]
    return f2, r2, float(dot)


def esd_target(host: Trainable, adapters: Adapters, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
               uncond: torch.Tensor, eta: float, y: torch.Tensor | None = None,
               y_uncond: torch.Tensor | None = None) -> torch.Tensor:
    """ε₀(x_t, ∅) − η[ε₀(x_t, c) − ε₀(x_t, ∅)] from the frozen model (trainable part switched off);
    `y`, `y_uncond`: the vector conditioning of `cond` and `uncond` where the model takes one."""
    with torch.no_grad(), adapters.only_fixed():
        e = host.eps(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([cond, uncond]), y=cat_y(y, y_uncond))
    ec, eu = e.chunk(2)
    return eu - eta * (ec - eu)


# ---- the trainer -------------------------------------------------------------------------------------
@dataclass
class TrainData:
    """What a run trains on. Retain row i < len(forget_prompts) is forget row i's twin (the order
    `paired_prompts` builds them in); the user's own retain prompts follow."""
    forget_prompts: list[str]
    retain_prompts: list[str]
    x_forget: torch.Tensor | None    # None where the configuration needs no forget images (ESD's sampled x_t)
    x_retain: torch.Tensor | None    # None where it has no retain pass (ESD)
    c_forget: torch.Tensor
    c_retain: torch.Tensor
    c_uncond: torch.Tensor
    seconds: float = 0.0
    # the vector conditioning y of each context row (SDXL), None for models that take none
    y_forget: torch.Tensor | None = None
    y_retain: torch.Tensor | None = None
    y_uncond: torch.Tensor | None = None
    c_concept: torch.Tensor | None = None  # the bare concept, ESD's prompt
    y_concept: torch.Tensor | None = None


def prepare_data(host, text: Text, concept: str, cfg: UnlearnConfig, retain_prompts: Sequence[str] = (),
                 family: str = "", ctx: RunContext | None = None) -> TrainData:
    """Prompts, the original model's images for them (those `cfg` trains on; in memory, optionally
    cached on disk) and their text embeddings. Done once per run, before any adapter is attached."""
    t0 = time.perf_counter()
    forget, retain = paired_prompts(concept, cfg.n_prompts, cfg.seed, family)
    if not forget:
        raise InvalidInputError(f"no training prompt for {concept!r} passed the safety filter; name the concept "
                                "differently")
    retain = retain + [p for p in retain_prompts if p.strip()]
    need_forget, need_retain = cfg.needs_images()
    # under torchrun rank 0 generates and sends the images: every process trains on the very same data
    here = distributed.is_main()
    gen = dict(steps=cfg.gen_steps, cfg=cfg.gen_cfg, cache_dir=cfg.cache_dir, ctx=ctx)
    xf = generate_latents(host, text, forget, seed=cfg.seed, **gen) if need_forget and here else None
    xr = generate_latents(host, text, retain, seed=cfg.seed + 1, **gen) if need_retain and here else None
    if distributed.active():
        xf, xr = distributed.broadcast(xf), distributed.broadcast(xr)
    with torch.no_grad():
        (cf, yf), (cr, yr), (cu, yu), (cc, yc) = (conditioning(host, text, p)
                                                  for p in (forget, retain, [""], [concept.strip()]))

    def fresh(v):
        return None if v is None else v.detach().float().clone()

    if not here:  # received on the CPU: where this process's own images would be
        xf, xr = (None if v is None else v.to(cf.device) for v in (xf, xr))
    return TrainData(forget, retain, xf, xr, fresh(cf), fresh(cr), fresh(cu), time.perf_counter() - t0,
                     fresh(yf), fresh(yr), fresh(yu), fresh(cc), fresh(yc))


def _rows(y: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if y is None else y[idx]


def _latent_shape(host, data: TrainData) -> tuple[int, ...]:
    """(C, H, W) of the latents this host trains at: the generated images' where there are some, else
    the host's own (`hosts.latent_shape`)."""
    if data.x_forget is not None:
        return tuple(data.x_forget.shape[1:])
    return latent_shape(host)


def extra_retain_rows(batch: int, n_twins: int, n_extra: int) -> int:
    """How many of the user's retain prompts join a twins retain batch: their share of the whole
    retain set, as the independent draw gives them (at least one a step, at most a batch)."""
    return 0 if n_extra <= 0 else min(batch, max(1, round(batch * n_extra / max(n_twins, 1))))


def compute_unlearn(host: Trainable, text: Text, concept: str, cfg: UnlearnConfig | None = None, *,
                    retain_prompts: Sequence[str] = (), family: str = "", ctx: RunContext | None = None,
                    data: TrainData | None = None, fixed: dict | None = None) -> Edit:
    """Erase `concept` by fine-tuning; returns an Edit (LoRA ``lowrank`` or ``delta`` Changes) whose
    ``metrics["history"]`` holds the per-step losses. The host's model is left unchanged."""
    asked = (cfg or UnlearnConfig()).validate()
    warned = official_warnings(asked, retain_prompts)
    for w in warned:
        log.warning("unlearn: %s", w)
    cfg = official_config(asked)
    if cfg.official == "rgd":
        retain_prompts = ()
    ctx = ctx or RunContext()
    if data is None:
        data = prepare_data(host, text, concept, cfg, retain_prompts, family, ctx)
    need_forget, need_retain = cfg.needs_images()
    if (need_forget and data.x_forget is None) or (need_retain and data.x_retain is None):
        raise InvalidInputError("the training data lacks the generated images this configuration trains on: "
                                "build it with prepare_data and the same config")
    unet = host.unet()
    modules = dict(unet.named_modules())
    names = select_targets(modules, cfg.param_set)
    # the official scripts fine-tune the weights themselves: a dense ΔW on the same layers
    kind = "lora" if cfg.param_set.startswith("lora") and cfg.official == "off" else "full"
    dev = data.c_forget.device
    adapters = Adapters(modules, names, kind=kind, rank=cfg.rank, seed=cfg.seed, fixed=fixed)
    params = adapters.parameters()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    ac = host.alphas_cumprod().float().to(dev)
    g = torch.Generator().manual_seed(cfg.seed + 17 + 1000 * ctx.rank)  # each process its own batches
    n_twins = len(data.forget_prompts)
    n_extra = len(data.retain_prompts) - n_twins
    n_user = extra_retain_rows(cfg.batch, n_twins, n_extra)
    use_esd = cfg.uses_esd
    sampled = use_esd and cfg.esd_xt == "sampled"
    if sampled:
        ddim_ts = ddim_timesteps(len(ac), cfg.esd_ddim_steps)
        # ESD's random stop step, among those whose timestep lies in [t_min, t_max]
        stops = [k for k in range(cfg.esd_ddim_steps) if cfg.t_min <= int(ddim_ts[k]) <= cfg.t_max]
        if not stops:
            raise InvalidInputError(f"none of the {cfg.esd_ddim_steps} DDIM steps lands in t ∈ [{cfg.t_min}, "
                                    f"{cfg.t_max}]: widen the range or take more esd_ddim_steps")
        shape = (cfg.batch,) + _latent_shape(host, data)
    c_concept, y_concept = data.c_concept, data.y_concept
    if use_esd and cfg.esd_prompt == "concept" and c_concept is None:
        with torch.no_grad():
            c_concept, y_concept = conditioning(host, text, [concept.strip()])

    def noised(x, rows):
        t = torch.randint(cfg.t_min, cfg.t_max + 1, (len(rows),), generator=g)
        noise = torch.randn((len(rows),) + tuple(x.shape[1:]), generator=g)
        return x[rows], t.to(dev), noise.to(dev)

    def esd_inputs(idx):
        """(x_t, t, c, y) of ESD's forget term for the forget rows `idx`."""
        if cfg.esd_prompt == "concept":
            c, y = c_concept.to(dev).expand(cfg.batch, -1, -1), rows_y(y_concept, cfg.batch)
        else:
            c, y = data.c_forget[idx], _rows(data.y_forget, idx)
        if not sampled:
            x0, t, noise = noised(data.x_forget, idx)
            return add_noise(x0, noise, t, ac), t, c, y
        k = stops[int(torch.randint(0, len(stops), (1,), generator=g))]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        with torch.no_grad(), adapters.only_fixed():  # the frozen model draws the concept
            xt = ddim_sample(host, c, data.c_uncond.expand_as(c), steps=cfg.esd_ddim_steps, cfg=cfg.esd_cfg,
                             seed=seed, shape=shape, ctx=ctx, y=y, y_uncond=rows_y(data.y_uncond, cfg.batch), stop=k)
        return xt.detach().to(dev), torch.full((cfg.batch,), int(ddim_ts[k]), device=dev), c, y

    def retain_rows(idx):
        if cfg.retain_pairing == "independent":
            return torch.randint(0, len(data.retain_prompts), (cfg.batch,), generator=g)
        if not n_user:
            return idx
        return torch.cat([idx, n_twins + torch.randint(0, n_extra, (n_user,), generator=g)])

    # Under torchrun (`editing.distributed.RowParallel`): every process draws the same batch from the
    # same generator and computes the loss of its share of the rows; the gradients are summed over the
    # processes before RGD's projection, so every process takes the step one process would take.
    rp = distributed.RowParallel(distributed.active() and ctx.average is None)
    dp = rp.on
    part, scaled = rp.part, rp.scaled

    def gradients(loss, share, skip=False):
        """This process's gradients (zeros without rows or with `skip`), summed over the processes under torchrun."""
        grads = _grads(loss, params) if share > 0 and not skip else [torch.zeros_like(p) for p in params]
        if dp and not skip:
            grads = rp.gradients(grads)
        elif ctx.average is not None:  # a caller's data-parallel hook: every process then takes the same step
            grads = ctx.average(grads)
        return grads

    def value(loss, share) -> float:
        return rp.total([float(loss.detach()) if share > 0 else 0.0])[0]

    def step(_i):
        idx = torch.randint(0, n_twins, (cfg.batch,), generator=g)  # the forget rows
        pf, share_f = part(cfg.batch)
        if use_esd:
            xt, tf, cf, yf = esd_inputs(idx)
            xt, tf, cf, yf = xt[pf], tf[pf], cf[pf], (None if yf is None else yf[pf])
            lf = None
            if share_f > 0:
                target = esd_target(host, adapters, xt, tf, cf, data.c_uncond.expand_as(cf), cfg.eta,
                                    y=yf, y_uncond=rows_y(data.y_uncond, cf.shape[0]))
                lf = scaled(objective_mse(host, host.eps(xt, tf, cf, y=yf), target, tf), share_f)
            loss_f = lf
        else:
            xf, tf, nf = noised(data.x_forget, idx)
            sub = idx[pf]
            lf = (scaled(diffusion_mse(host, xf[pf], data.c_forget[sub], tf[pf], nf[pf], ac, y=_rows(data.y_forget, sub)),
                         share_f) if share_f > 0 else None)
            # g_f = −∇L̃_f: ascent (GA is not truncated); under torchrun the truncation reads the whole
            # batch's loss below, and a share is at most that loss, so it never truncates a share
            loss_f = None if lf is None else -(lf if cfg.method == "ga" or dp else truncate_forget_loss(lf, cfg.truncation))
        lf_value = value(lf, share_f)
        # over m the truncated loss is constant: its backward is skipped
        g_f = gradients(loss_f, share_f, skip=cfg.method == "rgd" and not use_esd and lf_value > cfg.truncation)
        dot, lr_val = 0.0, None
        if cfg.method in ("rgd", "ga"):
            rows = retain_rows(idx)
            xr, tr, nr = noised(data.x_retain, rows)
            pr, share_r = part(len(rows))
            sub = rows[pr]
            lr_loss = (scaled(diffusion_mse(host, xr[pr], data.c_retain[sub], tr[pr], nr[pr], ac,
                                            y=_rows(data.y_retain, sub)), share_r) if share_r > 0 else None)
            g_r = gradients(lr_loss, share_r)
            if cfg.method == "rgd":
                g_f, g_r, dot = restricted_gradients(g_f, g_r)
                total = [f + cfg.alpha * r for f, r in zip(g_f, g_r)]
            else:
                total = [f + cfg.ga_retain_weight * r for f, r in zip(g_f, g_r)]
            lr_val = round(value(lr_loss, share_r), 6)
        else:
            total = g_f
        _take(opt, params, total)
        return {"forget": round(lf_value, 6), "retain": lr_val, "dot": round(dot, 9)}

    if dp and cfg.official != "off":
        raise InvalidInputError(f"official {cfg.official!r} follows a one-process script step by step: run it in one "
                                "process (without torchrun), or set official to off to split the batch over processes")
    if cfg.official == "esd":
        step = O.esd_step(host, adapters, params, opt, c=c_concept.to(dev), y=y_concept, c_uncond=data.c_uncond,
                          y_uncond=data.y_uncond, eta=cfg.eta, scale=cfg.esd_cfg, steps=cfg.esd_ddim_steps,
                          shape=_latent_shape(host, data), g=g, ctx=ctx)
    elif cfg.official == "rgd":
        step = O.rgd_step(host, params, opt, data, alpha=cfg.alpha, m=cfg.truncation, batch=cfg.batch, g=g, ctx=ctx)

    with frozen_session(unet), adapters.attached(), torch.enable_grad():
        run = train_loop(cfg.steps, step, ctx, what=f"unlearning ({cfg.method})",
                         hint=f"lower lr (now {cfg.lr}) or the truncation m")
    secs = run.seconds
    hist = {k: run.history.get(k, []) for k in ("forget", "retain", "dot")}
    edit = adapters.to_edit(f"unlearn-{cfg.method}", family or "unknown", concepts=[concept], params=asdict(asked))
    bare = use_esd and cfg.esd_prompt == "concept"
    edit.metrics.update({"history": hist, "steps_per_s": run.steps_per_s,
                         "train_seconds": round(secs, 2), "data_seconds": round(data.seconds, 2),
                         "forget_prompts": [concept.strip()] if bare else data.forget_prompts[:4],
                         "retain_prompts": data.retain_prompts[:4] if cfg.method in ("rgd", "ga") else []})
    if cfg.official != "off":
        edit.metrics["official_source"] = O.SOURCES[cfg.official]
    if warned:
        edit.metrics["warnings"] = warned
    log.info("unlearn %s %r: %d steps in %.1fs (%.2f steps/s)", cfg.method, concept, cfg.steps, secs, cfg.steps / max(secs, 1e-9))
    return edit

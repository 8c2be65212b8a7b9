"""Bilevel distill-and-unlearn for a pruned student (Shirkavand et al. 2024; PAPERS.md §5).

The student is the user's model with a pruning Edit applied (a ConceptPrune mask, a structured
neuron mask …); the teacher is the original. Both run on the same frozen module: the pruning edit is
attached as a fixed hook and the student's trainable part (LoRA, or dense ΔW that keeps pruned
weights at zero) on top, so the teacher is the same network with every hook switched off.

Alternating, with separate optimisers (the implemented form of min_θ max_ϑ L_CU(θ) + λ(L_ft(θ) − L_ft(ϑ))):
- distillation steps: L_ft = L_diff + w_out·MSE(ε_S, ε_T) + w_feat·Σ_blocks MSE(h_S, h_T), on images the
  teacher generated from general prompts (h = transformer-block outputs);
- every `erase_every`-th step an erase step: ε_S(x_t, c) → ε_T(x_t, ∅) − η[ε_T(x_t, c) − ε_T(x_t, ∅)].
With ``erase=False`` it is plain distillation (the first stage of the two-stage baseline).
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..arch import UNET_PREFIX
from ..diffusion import add_noise, generate_latents
from ..edit import Edit
from ..errors import InvalidInputError
from ..hooks import trace_outputs
from ..hosts import RunContext, TextEncoder, Trainable, base_weights, cat_y, conditioning, rows_y
from ..training import PARAM_SETS, Adapters, edit_as_fixed, frozen_session, select_targets, train_loop
from ..unlearn.trainer import GENERIC_TEMPLATES, esd_target, paired_prompts

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    steps: int = 100
    erase_every: int = 10        # 9 distillation steps, then 1 erase step
    erase: bool = True
    lr_distill: float = 1e-3
    lr_erase: float = 1e-3
    w_out: float = 2.0           # output KD weight
    w_feat: float = 0.1          # feature KD weight (transformer-block outputs)
    eta: float = 1.0
    param_set: str = "lora"
    rank: int = 4
    keep_pruned: bool = True     # dense sets only: pruned (zero) weights stay zero
    batch: int = 4
    n_prompts: int = 16
    gen_steps: int = 20
    gen_cfg: float = 5.0
    seed: int = 0

    def validate(self) -> "DistillConfig":
        if self.steps < 1 or self.erase_every < 2 or self.batch < 1 or self.n_prompts < 1:
            raise InvalidInputError("need steps ≥ 1, erase_every ≥ 2 (e.g. 10 for 9:1), batch and n_prompts ≥ 1")
        if self.param_set not in PARAM_SETS:
            raise InvalidInputError(f"param_set must be one of {', '.join(PARAM_SETS)}")
        if min(self.lr_distill, self.lr_erase) <= 0 or min(self.w_out, self.w_feat) < 0:
            raise InvalidInputError("learning rates must be > 0 and KD weights ≥ 0")
        return self


def compute_distill_unlearn(teacher: Trainable, text: TextEncoder, student_edit: Edit | None, concept: str,
                            cfg: DistillConfig | None = None, *, distill_prompts: Sequence[str] = (),
                            family: str = "", ctx: RunContext | None = None,
                            latents: dict | None = None, student: Trainable | None = None) -> Edit:
    """Train the pruned student; returns the trained part as an Edit (apply it together with
    `student_edit`). ``metrics["history"]`` has the distillation and erase losses.

    The student is either the teacher's own network with `student_edit` (a pruning mask …) attached
    as a fixed part, or, with `student`, a model of its own (another layout: blocks removed, other
    widths) read through the same text encoder; then feature KD pairs the transformer blocks both
    models have under the same name and shape, and the trained part is an edit of `student`."""
    cfg = cfg.validate() if cfg else DistillConfig().validate()
    ctx = ctx or RunContext()
    if student is None and student_edit is None:
        raise InvalidInputError("give the student: a pruning edit of the teacher, or a student model of its own")
    forget, retain = paired_prompts(concept, cfg.n_prompts, cfg.seed, family) if cfg.erase else ([], [])
    general = list(distill_prompts) or retain or [t.format(concept="", emotion="calm", action="standing",
                                                           place="in a park") for t in GENERIC_TEMPLATES]
    latents = latents if latents is not None else {}
    gen = dict(steps=cfg.gen_steps, cfg=cfg.gen_cfg, ctx=ctx)
    if "general" not in latents:
        latents["general"] = generate_latents(teacher, text, general, seed=cfg.seed, **gen)
    if cfg.erase and "forget" not in latents:
        latents["forget"] = generate_latents(teacher, text, forget, seed=cfg.seed + 1, **gen)

    def encoded(host, prompts):  # (context, y), detached copies (y: SDXL's vector conditioning, else None)
        c, y = conditioning(host, text, prompts)
        return c.detach().float().clone(), None if y is None else y.detach().float().clone()

    trainee = student or teacher
    with torch.no_grad():
        c_gen, y_gen = encoded(teacher, general)
        c_f, y_f = encoded(teacher, forget) if cfg.erase else (None, None)
        c_u, y_u = encoded(teacher, [""])
        # the student's own y where it takes one (a distilled SDXL may size-embed differently)
        ys_gen = encoded(trainee, general)[1] if student is not None else y_gen
        ys_f = (encoded(trainee, forget)[1] if cfg.erase else None) if student is not None else y_f
    x_gen, x_f = latents["general"], latents.get("forget")
    unet = trainee.unet()
    modules = dict(unet.named_modules())
    base = base_weights(trainee)
    fixed = edit_as_fixed([(student_edit, 1.0)], modules, base) if student_edit is not None else {}
    kind = "lora" if cfg.param_set.startswith("lora") else "full"
    # keep_pruned: build the dense adapter against the *student's* weights, whose pruned entries are 0
    ad = Adapters(modules, select_targets(modules, cfg.param_set), kind=kind, rank=cfg.rank, seed=cfg.seed, fixed=fixed)
    if kind == "full" and cfg.keep_pruned:
        for name, slot in ad.slots.items():
            key = f"{UNET_PREFIX}{name}.weight"
            w = (base[key] if base is not None and key in base else slot.module.weight).detach().float()
            w = w.to(slot.module.weight.device) + fixed.get(name, 0)
            slot.keep = (w != 0).float()
    params = ad.parameters()
    opt_d = torch.optim.Adam(params, lr=cfg.lr_distill)
    opt_e = torch.optim.Adam(params, lr=cfg.lr_erase)
    blocks = [n for n in modules if n.rsplit(".", 2)[-2:-1] == ["transformer_blocks"]]
    t_unet = teacher.unet() if student is not None else unet
    t_modules = dict(t_unet.named_modules()) if student is not None else modules
    blocks = [n for n in blocks if n in t_modules]
    ac = teacher.alphas_cumprod().float().to(x_gen.device)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    feats: dict[str, torch.Tensor] = {}
    t_feats: dict[str, torch.Tensor] = feats if student is None else {}

    def keep(name, out):
        feats[name] = out
        return None

    def keep_teacher(name, out):
        t_feats[name] = out.detach()
        return None

    def draw(x, c, y, ys):
        idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=g)
        t = torch.randint(0, len(ac), (cfg.batch,), generator=g).to(x.device)
        noise = torch.randn((cfg.batch,) + tuple(x.shape[1:]), generator=g).to(x.device)
        pick = (lambda v: None if v is None else v[idx])
        return add_noise(x[idx], noise, t, ac), t, c[idx], pick(y), pick(ys), noise

    def teacher_eps(xt, t, c, y):
        with torch.no_grad(), ad.original():
            return teacher.eps(xt, t, c, y=y)

    def erase_target(xt, t, c, y):
        if student is None:
            with ad.original():
                return esd_target(teacher, ad, xt, t, c, c_u.expand_as(c), cfg.eta,
                                  y=y, y_uncond=rows_y(y_u, c.shape[0]))
        e = teacher_eps(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([c, c_u.expand_as(c)]),
                        cat_y(y, rows_y(y_u, c.shape[0])))
        ec, eu = e.chunk(2)
        return eu - cfg.eta * (ec - eu)

    def step(i):
        if cfg.erase and (i + 1) % cfg.erase_every == 0:
            xt, t, c, y, ys, _ = draw(x_f, c_f, y_f, ys_f)
            target = erase_target(xt, t, c, y)
            feats.clear()
            loss = F.mse_loss(trainee.eps(xt, t, c, y=ys), target)
            opt, record = opt_e, lambda v: {"erase": [i, v]}
        else:
            xt, t, c, y, ys, noise = draw(x_gen, c_gen, y_gen, ys_gen)
            e_t = teacher_eps(xt, t, c, y)
            f_t = {k: v.detach() for k, v in t_feats.items()}
            feats.clear()
            e_s = trainee.eps(xt, t, c, y=ys)
            l_diff = F.mse_loss(e_s, noise)
            l_out = F.mse_loss(e_s, e_t)
            pairs = [k for k in f_t if k in feats and feats[k].shape == f_t[k].shape]
            l_feat = sum(F.mse_loss(feats[k].float(), f_t[k].float()) for k in pairs) if pairs else torch.zeros(())
            loss = l_diff + cfg.w_out * l_out + cfg.w_feat * l_feat
            opt, record = opt_d, lambda v: {"distill": v}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        feats.clear()
        t_feats.clear()
        return record(round(float(loss.detach()), 6))

    with ExitStack() as stack:
        stack.enter_context(frozen_session(unet))
        if student is not None:
            stack.enter_context(frozen_session(t_unet))
            stack.enter_context(trace_outputs(t_modules, blocks, keep_teacher))
        stack.enter_context(ad.attached())
        stack.enter_context(trace_outputs(modules, blocks, keep))
        stack.enter_context(torch.enable_grad())
        run = train_loop(cfg.steps, step, ctx, what="distill-and-unlearn", hint="lower the learning rates")
    hist = {"distill": run.history.get("distill", []), "erase": run.history.get("erase", [])}
    name = "distill-unlearn" if cfg.erase else "distill"
    edit = ad.to_edit(name, family or (student_edit.family if student_edit is not None else "custom"),
                      concepts=[concept] if cfg.erase else [],
                      params={**asdict(cfg), "student_edit": student_edit.method if student_edit is not None else "",
                              "separate_student": student is not None})
    edit.metrics.update({"history": hist, "steps_per_s": run.steps_per_s})
    return edit

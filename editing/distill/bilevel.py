"""Bilevel distill-and-unlearn for a pruned student (Shirkavand et al. 2024).

The student is the user's model with a pruning Edit applied (a ConceptPrune mask, a structured
neuron mask …); the teacher is the original. Both run on the same frozen module: the pruning edit is
attached as a fixed hook and the student's trainable part (LoRA, or dense ΔW) on top, so the teacher
is the same network with every hook switched off.

Alternating, with two AdamW optimisers (the implemented form of min_θ max_ϑ L_CU(θ) + λ(L_ft(θ) − L_ft(ϑ))):
- distillation steps: L_ft = L_diff + w_out·MSE(ε_S, ε_T) + w_feat·mean_levels MSE(h_S, h_T), on images
  the teacher generated from general prompts. L_diff is the Min-SNR-γ weighted ε-MSE (γ = 5), h the
  outputs of the UNet's levels: every down level, the middle block, every up level (9 on SD1.x/SD2.x,
  7 on SDXL), as the official code hooks diffusers' down_blocks / mid_block / up_blocks;
- every `erase_every`-th step an erase step: ε_S(x_t, c) → ε_T(x_t, ∅) − η[ε_T(x_t, c) − ε_T(x_t, ∅)].
With ``erase=False`` it is plain distillation (the first stage of the two-stage baseline).

``official="bilevel"`` runs the official loop instead (rezashkv/unlearn-ft, BilevelUnetFineTuner):
every step a distillation step, and after every `erase_every`-th one an extra erase step with η 1;
batches in shuffled epochs (no replacement), ε then t drawn per row; a dense ΔW on the parameter
set's layers (the official code fine-tunes the student's weights themselves).

Weights the pruning zeroed stay exactly zero (``keep_pruned``): the LoRA's contribution on a pruned
layer is (B·A)⊙(1 − M) in training, and folds back as what ComfyUI patches, edit files and exports
can hold exactly: a low-rank pair with the pruned rows of B and columns of A zeroed when M is whole
neurons (rows/columns), else the dense ΔW of that layer (see `_KeepPruned`).
"""
from __future__ import annotations

import logging
import re
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .. import distributed
from ..arch import UNET_PREFIX
from ..diffusion import add_noise, generate_latents, objective_mse, objective_weights, weighted_mse
from ..edit import Change, Edit
from ..errors import InvalidInputError
from ..hooks import trace_outputs
from ..hosts import RunContext, Text, Trainable, base_weights, cat_y, conditioning, rows_y
from ..training import Adapters, edit_as_fixed, frozen_session, select_targets, train_loop
from ..unlearn.trainer import GENERIC_TEMPLATES, esd_target, paired_prompts
from .config import OFFICIAL_SOURCE, PRUNED_SHARE, DistillConfig

log = logging.getLogger(__name__)


# What the official code fixes that the pack leaves to a setting: name -> (value, why).
_OFFICIAL_FIXED: dict[str, tuple[object, str]] = {
    "eta": (1.0, "the official upper target is ε_T(∅) − (ε_T(c) − ε_T(∅)), η fixed at 1"),
    "feature_kd": ("levels", "the official block loss is the mean over the UNet's level outputs"),
    "keep_pruned": ("mask", "the official student has its pruned channels removed, so they stay zero and every "
                            "other weight trains"),
    "rank": (None, "the official code fine-tunes the student's weights themselves (full rank, no LoRA)"),
}


def official_config(cfg: DistillConfig) -> DistillConfig:
    """The settings a run under `cfg.official` reads (the official code's fixed choices in place of the pack's)."""
    if cfg.official == "off":
        return cfg
    return replace(cfg, **{k: v for k, (v, _) in _OFFICIAL_FIXED.items() if v is not None})


def official_warnings(cfg: DistillConfig) -> list[str]:
    """One line per setting the user changed from its default that `cfg.official` ignores."""
    if cfg.official == "off":
        return []
    defaults = DistillConfig()
    return [f"official {cfg.official} ignores {name}={getattr(cfg, name)!r}: {why}"
            for name, (fixed, why) in _OFFICIAL_FIXED.items()
            if getattr(cfg, name) != getattr(defaults, name) and getattr(cfg, name) != fixed]


# ---- the losses ----------------------------------------------------------------------------------
def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights of an ε-MSE (Hang et al. 2023), min(SNR_t, γ)/SNR_t with SNR = ᾱ/(1 − ᾱ):
    the ε-loss times this is min(SNR, γ)·‖x̂₀ − x₀‖². `Trainable.eps` gives ε for every prediction
    type, so this is the ε form also for v-models (the official code's SNR + 1 is for a loss in v)."""
    a = alphas_cumprod[t.to(alphas_cumprod.device).long()].double()
    snr = a / (1 - a)
    return (snr.clamp(max=gamma) / snr).float()


def diffusion_loss(eps_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The per-sample ε-MSE weighted by `weights` [B] and averaged (None: the plain ε-MSE)."""
    return weighted_mse(eps_pred, noise, weights)


def feature_kd(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
               mode: str = "levels") -> tuple[torch.Tensor, list[str]]:
    """(feature-KD loss, the outputs paired): the MSE of each output both models have with equal
    shapes, averaged over them ("levels", the official form) or summed ("blocks")."""
    pairs = [k for k in teacher if k in student and student[k].shape == teacher[k].shape]
    if not pairs:
        return torch.zeros(()), pairs
    total = sum(F.mse_loss(student[k].float(), teacher[k].float().detach()) for k in pairs)
    return (total / len(pairs) if mode == "levels" else total), pairs


# ---- which outputs feature KD reads --------------------------------------------------------------
def _ends_level(block: torch.nn.Module) -> bool:
    # ComfyUI's Downsample/Upsample, or a ResBlock that resamples (resblock_updown layouts)
    return any(type(m).__name__ in ("Downsample", "Upsample") or getattr(m, "updown", False) is True
               for m in block.children())


def _last_child(prefix: str, block: torch.nn.Module) -> str | None:
    # ComfyUI runs a TimestepEmbedSequential through `forward_timestep_embed`, layer by layer, so a
    # hook on the block itself never fires: its output is its last layer's output.
    kids = list(block.named_children())
    return f"{prefix}.{kids[-1][0]}" if kids else None


def level_outputs(unet: torch.nn.Module) -> dict[str, str]:
    """Module name -> level tag ("down.i", "mid", "up.i") of the modules whose outputs are the
    UNet's level outputs, read from its own layout (ComfyUI's UNetModel): a down or up level ends at
    its Downsample/Upsample or at the last block of its side, as diffusers' down_blocks / up_blocks
    do (their output after the resampler); input_blocks.0 (conv_in) belongs to none. SD1.x/SD2.x
    give 4 + 1 + 4, SDXL 3 + 1 + 3, a student with blocks removed what it has."""
    ins, outs = getattr(unet, "input_blocks", None), getattr(unet, "output_blocks", None)
    dit = dit_block_features(dict(unet.named_modules()))
    if (ins is None or outs is None) and dit:
        return dit
    if ins is None or outs is None:
        raise InvalidInputError("this UNet has no input_blocks/output_blocks (not a ComfyUI UNetModel), so its level "
                                "outputs are unknown: use feature_kd 'blocks' or w_feat 0")
    out: dict[str, str] = {}
    for side, blocks, first in (("input_blocks", ins, 1), ("output_blocks", outs, 0)):
        level = 0
        for i in range(first, len(blocks)):
            if _ends_level(blocks[i]) or i == len(blocks) - 1:
                name = _last_child(f"{side}.{i}", blocks[i])
                if name is not None:
                    out[name] = f"{'down' if side == 'input_blocks' else 'up'}.{level}"
                level += 1
        if side == "input_blocks":
            mid = getattr(unet, "middle_block", None)
            name = _last_child("middle_block", mid) if mid is not None else None
            if name is not None:
                out[name] = "mid"
    return out


_DIT_FEATURES = re.compile(r"^(?:double_blocks\.\d+\.img_mlp|single_blocks\.\d+|joint_blocks\.\d+\.x_block\.mlp)$")


def dit_block_features(modules: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """An MMDiT's per-block image features (module name -> itself): Flux double blocks' image MLP
    and single blocks' outputs, SD3 joint blocks' x_block MLP. A double or joint block returns its
    image and text streams as a pair, so their image MLP stands for the block; both feature-KD
    forms read these on an MMDiT."""
    return {n: n for n in modules if _DIT_FEATURES.match(n)}


def transformer_block_outputs(modules: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """Module name -> itself for every transformer block (the `feature_kd="blocks"` form)."""
    return {n: n for n in modules if n.rsplit(".", 2)[-2:-1] == ["transformer_blocks"]} or dit_block_features(modules)


# ---- pruned weights stay pruned --------------------------------------------------------------------
def pruned_entries(student_edit: Edit | None, modules: Mapping[str, torch.nn.Module], names: Sequence[str],
                   base: Mapping[str, torch.Tensor] | None,
                   fixed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> bool mask (True = pruned) of the layers in `names` whose weights the student's
    pruning zeroed: a mask change's M; for a dense change (a patched student read off as a model
    difference) the entries it moves to exactly 0; without an edit (a student model of its own) the
    exact zeros of layers at least `PRUNED_SHARE` zero."""
    wanted, out = set(names), {}
    if student_edit is None:
        for name in names:
            zero = modules[name].weight.detach() == 0
            if float(zero.float().mean()) >= PRUNED_SHARE:
                out[name] = zero
        return out
    for key, change in student_edit.changes.items():
        unet_weight = key.startswith(UNET_PREFIX) and key.endswith(".weight")
        name = key[len(UNET_PREFIX):-len(".weight")] if unet_weight else None
        if name not in wanted:
            continue
        w_mod = modules[name].weight
        if change.kind == "mask":
            m = change.mask(device=w_mod.device).reshape(w_mod.shape)
        else:
            w = (base[key] if base is not None and key in base else w_mod).detach().float().to(w_mod.device)
            d = fixed[name].to(w_mod.device)
            m = ((w + d) == 0) & (d != 0)
        if bool(m.any()):
            out[name] = m
    return out


@dataclass
class _Keep:
    rows: torch.Tensor | None = None   # neuron masks: 1 for kept output rows / input columns
    cols: torch.Tensor | None = None
    entries: torch.Tensor | None = None  # any other mask: bool, True = kept


class _KeepPruned(Adapters):
    """`Adapters` whose LoRA pairs on pruned layers add (B·A)⊙(1 − M) instead of B·A, and fold back
    in a form every route (ComfyUI patches, edit files, LoRA/diffusers export) adds exactly.

    ComfyUI's patches, and so a saved edit applied after the student's own, are additive and a mask
    resolves against the base weight (−W⊙M), so applying the pruning "after" the LoRA cannot zero
    what the LoRA added: the trained part itself must be 0 on M. When M is whole neurons (pruned rows
    r and columns c, M = r ∨ c, the structured pruning the official code trains) the masked product
    is the low-rank pair (diag(1−r)·B, A·diag(1−c)): exact and small. An unstructured mask
    (ConceptPrune's per-row top-k) has no such pair, so that layer folds back as its dense ΔW; use
    keep_pruned "skip" to train the other layers only and keep the file small."""

    def __init__(self, *args, pruned: Mapping[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: dict[str, _Keep] = {}
        for name, m in (pruned or {}).items():
            s = self.slots[name]
            dev = next(iter(s.params.values())).device
            m = m.to(dev)
            if s.kind == "full":  # Adapters' own mechanism for dense sets
                s.keep = (~m).float()
                continue
            rows, cols = m.all(dim=1), m.all(dim=0)
            if torch.equal(m, rows[:, None] | cols[None, :]):
                self.kept[name] = _Keep(rows=(~rows).float(), cols=(~cols).float())
            else:
                self.kept[name] = _Keep(entries=~m)

    def _pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        s, k = self.slots[name], self.kept[name]
        return s.params["up"] * s.scale * k.rows[:, None], s.params["down"] * k.cols

    def _masked(self, name: str) -> torch.Tensor:
        s, k = self.slots[name], self.kept[name]
        if k.entries is None:
            up, down = self._pair(name)
            return up @ down
        return torch.where(k.entries, (s.params["up"] @ s.params["down"]) * s.scale, 0.0)

    def _extra(self, name, mod, x):
        if name not in self.kept or not self.enabled:
            return super()._extra(name, mod, x)
        k = self.kept[name]
        if k.entries is None:
            up, down = self._pair(name)
            h = F.linear(F.linear(x.float(), down), up)
        else:
            h = F.linear(x.float(), self._masked(name))
        d = self.fixed.get(name) if self.fixed_enabled else None
        return h if d is None else h + F.linear(x.float(), d)

    def delta(self, name: str) -> torch.Tensor:
        if name not in self.kept:
            return super().delta(name)
        with torch.no_grad():
            return self._masked(name).float()

    def to_edit(self, method: str, family: str, **meta) -> Edit:
        edit = super().to_edit(method, family, **meta)
        for name, k in self.kept.items():
            key = f"{UNET_PREFIX}{name}.weight"
            shape = tuple(self.slots[name].module.weight.shape)
            edit.changes.pop(key, None)
            with torch.no_grad():
                if k.entries is None:
                    up, down = (t.detach().float().cpu().contiguous() for t in self._pair(name))
                    if bool(up.any()) and bool(down.any()):
                        edit.changes[key] = Change("lowrank", shape, {"up": up, "down": down})
                else:
                    d = self._masked(name).detach().float().cpu().contiguous()
                    if bool(d.any()):
                        edit.changes[key] = Change("delta", shape, {"delta": d})
        edit.check_finite()
        return edit


# ---- the trainer ---------------------------------------------------------------------------------
def _adamw(params, lr: float, cfg: DistillConfig) -> torch.optim.Optimizer:
    # the official get_optimizer: AdamW, betas (0.9, 0.999), eps 1e-8, its param group's weight decay 0
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def _warmup(opt: torch.optim.Optimizer, steps: int):
    """diffusers' constant_with_warmup: lr · min(1, s / steps) at the optimiser's step s (None: no warm-up)."""
    if steps <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / steps if s < steps else 1.0)


class _Loader:
    """The row batches of a DataLoader with shuffle on over n rows: a permutation drawn from `g` when an
    epoch starts, cut into batches in order (the last one of an epoch may be short)."""

    def __init__(self, n: int, batch: int, g: torch.Generator):
        self.n, self.batch, self.g = n, batch, g
        self.perm, self.pos = torch.empty(0, dtype=torch.long), n

    def next(self) -> torch.Tensor:
        if self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        rows = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return rows


def compute_distill_unlearn(teacher: Trainable, text: Text, student_edit: Edit | None, concept: str,
                            cfg: DistillConfig | None = None, *, distill_prompts: Sequence[str] = (),
                            family: str = "", ctx: RunContext | None = None,
                            latents: dict | None = None, student: Trainable | None = None) -> Edit:
    """Train the pruned student; returns the trained part as an Edit (apply it together with
    `student_edit`). ``metrics["history"]`` has the distillation and erase losses and each
    distillation step's [diffusion, output KD, feature KD] terms; ``metrics["kd_outputs"]`` the
    outputs feature KD paired; ``metrics["pruned_layers"]`` the layers whose pruned weights were
    held at zero.

    The student is either the teacher's own network with `student_edit` (a pruning mask …) attached
    as a fixed part, or, with `student`, a model of its own (another layout: blocks removed, other
    widths) read through the same text encoder; then feature KD pairs the outputs both models have
    (the same level, or the same transformer block, with the same shape), and the trained part is
    an edit of `student`."""
    asked = cfg.validate() if cfg else DistillConfig().validate()
    warned = official_warnings(asked)
    for w in warned:
        log.warning("distill: %s", w)
    cfg = official_config(asked)
    ctx = ctx or RunContext()
    if student is None and student_edit is None:
        raise InvalidInputError("give the student: a pruning edit of the teacher, or a student model of its own")
    # Under torchrun every process draws the same batches and computes its share of each batch's rows;
    # the gradients are summed over the processes before each step (`distributed.RowParallel`)
    rp = distributed.RowParallel()
    if rp.on and cfg.official != "off":
        raise InvalidInputError(f"official {cfg.official!r} follows a one-process script step by step: run it in one "
                                "process (without torchrun), or set official to off to split the batches over processes")
    forget, retain = paired_prompts(concept, cfg.n_prompts, cfg.seed, family) if cfg.erase else ([], [])
    general = list(distill_prompts) or retain or [t.format(concept="", emotion="calm", action="standing",
                                                           place="in a park") for t in GENERIC_TEMPLATES]
    latents = latents if latents is not None else {}
    gen = dict(steps=cfg.gen_steps, cfg=cfg.gen_cfg, ctx=ctx)
    # under torchrun rank 0 generates the images and sends them: every process trains on the same data
    here = distributed.is_main()
    for key, prompts, seed in (("general", general, cfg.seed), ("forget", forget, cfg.seed + 1)):
        if key in latents or (key == "forget" and not cfg.erase):
            continue
        made = generate_latents(teacher, text, prompts, seed=seed, **gen) if here else None
        latents[key] = distributed.broadcast(made)

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
    # the official code fine-tunes the student's weights themselves: a dense ΔW on the same layers
    kind = "lora" if cfg.param_set.startswith("lora") and cfg.official == "off" else "full"
    targets = select_targets(modules, cfg.param_set)
    pruned = pruned_entries(student_edit, modules, targets, base, fixed) if cfg.keep_pruned != "off" else {}
    if cfg.keep_pruned == "skip":
        targets = [n for n in targets if n not in pruned]
        if not targets:
            raise InvalidInputError(f"every layer of the parameter set {cfg.param_set!r} is pruned, so keep_pruned "
                                    "'skip' leaves nothing to train: use 'mask' or another parameter set")
        pruned = {}
    ad = _KeepPruned(modules, targets, kind=kind, rank=cfg.rank, seed=cfg.seed, fixed=fixed, pruned=pruned)
    if pruned:
        log.info("distill: %d pruned layers keep %d weights at zero", len(pruned),
                 sum(int(m.sum()) for m in pruned.values()))
    params = ad.parameters()
    opt_d = _adamw(params, cfg.lr_distill, cfg)
    opt_e = _adamw(params, cfg.lr_erase, cfg)
    sched_d, sched_e = _warmup(opt_d, cfg.warmup_steps), _warmup(opt_e, cfg.warmup_steps)
    t_unet = teacher.unet() if student is not None else unet
    t_modules = dict(t_unet.named_modules()) if student is not None else modules
    if cfg.feature_kd == "levels":
        tags, t_tags = level_outputs(unet), level_outputs(t_unet)
    else:
        tags, t_tags = transformer_block_outputs(modules), transformer_block_outputs(t_modules)
    if student is None:
        t_tags = {}  # one network: the same hooks record the teacher's pass and the student's
    x_gen = x_gen.to(c_gen.device)
    x_f = None if x_f is None else x_f.to(c_gen.device)
    ac = teacher.alphas_cumprod().float().to(x_gen.device)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    feats: dict[str, torch.Tensor] = {}
    t_feats: dict[str, torch.Tensor] = feats if student is None else {}
    paired: set[str] = set()

    def _tensor(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def keep(name, out):
        feats[tags[name]] = _tensor(out)
        return None

    def keep_teacher(name, out):
        t_feats[t_tags[name]] = _tensor(out).detach()
        return None

    def rows_at(x, c, y, ys, idx, t, noise):
        """The inputs of this process's share of the drawn rows, and that share (all of them in one process)."""
        pos, share = rp.part(len(idx))
        idx, t, noise = idx[pos], t[pos].to(x.device), noise[pos].to(x.device)
        pick = (lambda v: None if v is None else v[idx])
        return add_noise(x[idx], noise, t, ac), t, c[idx], pick(y), pick(ys), noise, share

    def draw(x, c, y, ys):  # rows with replacement, then t, then ε
        idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=g)
        t = torch.randint(0, len(ac), (cfg.batch,), generator=g)
        return rows_at(x, c, y, ys, idx, t, torch.randn((cfg.batch,) + tuple(x.shape[1:]), generator=g))

    def draw_official(x, c, y, ys, rows):  # the official step's order: ε, then t, per row of the loader's batch
        noise = torch.randn((len(rows),) + tuple(x.shape[1:]), generator=g)
        return rows_at(x, c, y, ys, rows, torch.randint(0, len(ac), (len(rows),), generator=g), noise)

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

    def update(opt, sched, loss, share, terms=()):
        """One step of `opt` on this process's rows (`loss` None: it has none; `RowParallel.step`);
        the batch's loss and `terms`."""
        values = rp.step(opt, params, loss, share, terms)
        if sched is not None:
            sched.step()
        feats.clear()
        t_feats.clear()
        return values

    def erase_update(i, xt, t, c, y, ys, _noise, share):
        loss = None
        if share > 0:
            target = erase_target(xt, t, c, y)
            feats.clear()
            loss = objective_mse(trainee, trainee.eps(xt, t, c, y=ys), target, t)
        return {"erase": [i, round(update(opt_e, sched_e, loss, share)[0], 6)]}

    def distill_update(xt, t, c, y, ys, noise, share):
        if share == 0:  # no rows here: zero gradients and zero terms into the processes' sums
            total, *terms = update(opt_d, sched_d, None, share, (None,) * 3)
            return {"distill": round(total, 6), "distill_terms": [float(f"{v:.6g}") for v in terms]}
        e_t = teacher_eps(xt, t, c, y)
        f_t = {k: v.detach() for k, v in t_feats.items()}
        feats.clear()
        e_s = trainee.eps(xt, t, c, y=ys)
        # Min-SNR is itself a weighting of the x₀ error; without it, the model's own objective
        w = min_snr_weights(ac, t, cfg.min_snr_gamma) if cfg.min_snr_gamma > 0 else objective_weights(trainee, t)
        l_diff = diffusion_loss(e_s, noise, w)
        l_out = objective_mse(trainee, e_s, e_t, t)
        l_feat, pairs = feature_kd(feats, f_t, cfg.feature_kd)
        paired.update(pairs)
        loss = l_diff + cfg.w_out * l_out + cfg.w_feat * l_feat.to(l_diff.device)
        total, *terms = update(opt_d, sched_d, loss, share, (l_diff, l_out, l_feat))
        return {"distill": round(total, 6), "distill_terms": [float(f"{v:.6g}") for v in terms]}

    def step(i):  # the erase step takes the place of every erase_every-th distillation step
        if cfg.erase and (i + 1) % cfg.erase_every == 0:
            return erase_update(i, *draw(x_f, c_f, y_f, ys_f))
        return distill_update(*draw(x_gen, c_gen, y_gen, ys_gen))

    lower = _Loader(x_gen.shape[0], cfg.batch, g)
    upper = _Loader(x_f.shape[0], cfg.batch, g) if cfg.erase else None

    def step_official(i):  # BilevelUnetFineTuner.train: every step a lower step, every erase_every-th an upper one too
        record = distill_update(*draw_official(x_gen, c_gen, y_gen, ys_gen, lower.next()))
        if cfg.erase and (i + 1) % cfg.erase_every == 0:
            record.update(erase_update(i, *draw_official(x_f, c_f, y_f, ys_f, upper.next())))
        return record

    with ExitStack() as stack:
        stack.enter_context(frozen_session(unet))
        if student is not None:
            stack.enter_context(frozen_session(t_unet))
            stack.enter_context(trace_outputs(t_modules, list(t_tags), keep_teacher))
        stack.enter_context(ad.attached())
        stack.enter_context(trace_outputs(modules, list(tags), keep))
        stack.enter_context(torch.enable_grad())
        run = train_loop(cfg.steps, step_official if cfg.official == "bilevel" else step, ctx,
                         what="distill-and-unlearn", hint="lower the learning rates")
    hist = {k: run.history.get(k, []) for k in ("distill", "erase", "distill_terms")}
    name = "distill-unlearn" if cfg.erase else "distill"
    edit = ad.to_edit(name, family or (student_edit.family if student_edit is not None else "custom"),
                      concepts=[concept] if cfg.erase else [],
                      params={**asdict(asked), "student_edit": student_edit.method if student_edit is not None else "",
                              "separate_student": student is not None})
    order = list(tags.values())
    edit.metrics.update({"history": hist, "steps_per_s": run.steps_per_s,
                         "kd_outputs": [k for k in order if k in paired],
                         "pruned_layers": sorted(pruned)})
    if cfg.official != "off":
        edit.metrics["official_source"] = OFFICIAL_SOURCE
    if warned:
        edit.metrics["warnings"] = warned
    return edit

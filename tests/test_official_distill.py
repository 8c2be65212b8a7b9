"""`official="bilevel"` for distill-and-unlearn against a reference written from the official code, on
the bundled tiny model's real UNet and text encoder (ComfyUI's classes), fed the same weights, text
embeddings, latents, seed and initial optimiser state.

The reference is a plain torch loop over copies of the UNet (teacher, and a student with the pruned
weights zeroed and their gradients held at zero, as the official student has those channels removed),
read from rezashkv/unlearn-ft, commit 7a9f282d17311f506c587437a3fd8ad9fa5b7bbc:
pdm/training/trainer.py — BilevelUnetFineTuner.train (a lower step every step, an upper step after
every upper_step_freq-th), UnetFineTuner.step (the lower loss: Min-SNR-γ diffusion term for ε
prediction, the block loss averaged over the hooked levels, output distillation), upper_step (the
teacher's ε(∅) − (ε(c) − ε(∅)) target), init_optimizer / get_optimizer / init_upper_optimizer (two
AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0), cast_block_act_hooks (down_blocks[i] output[0],
mid_block, up_blocks[i]); configs/baselines/sd-2-1_coco_aptp_both_512_bilevel.yaml (weights 1 / 2.0 /
0.1, γ 5, upper weight 1). The levels are found on ComfyUI's UNet by `bilevel.level_outputs`, checked
against the official nine of SD1.x in tests/test_distill.py. Batches: the pack's documented draws
(seed + 3; each loader's permutation when its epoch starts, then ε, then t per row).

Tolerance: the pack's ε passes through ComfyUI's model sampling and the pruning through a hook (W x −
(W⊙M) x instead of (W⊙(1−M)) x), float32 round-off of ~1e-6; AdamW's first steps are lr·g/(|g| + 1e-8).
Asserted: relative Frobenius distance of the update ≤ 1e-3 (measured ~1e-5), leaving out the weights
whose gradient is at round-off level (`SMALL`). Run with -s for the measured values.
"""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conceptedit.editing.arch import UNET_PREFIX
from conceptedit.editing.distill import bilevel
from conceptedit.editing.distill.bilevel import compute_distill_unlearn, level_outputs
from conceptedit.editing.distill.config import OFFICIAL, DistillConfig
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.hooks import copy_norm_inputs
from conceptedit.editing.hosts import conditioning, latent_shape
from conceptedit.editing.training import select_targets
from conceptedit.editing.unlearn.trainer import paired_prompts
from conceptedit.tiny.model import DEFAULT_WEIGHTS
import test_official_unlearn as _unlearn

pytestmark = pytest.mark.skipif(not os.path.isfile(DEFAULT_WEIGHTS),
                                reason="tiny weights missing: bash run.sh py -m tiny.train")
# the same tolerance, tiny model (host, text) and one-thread fixtures as the unlearning test
TOL, tiny, _one_thread = _unlearn.TOL, _unlearn.tiny, _unlearn._one_thread

# A gradient below this is round-off (e.g. a ResBlock's time-embedding projection in front of a GroupNorm
# with one channel per group, which removes it exactly: ~1e-9 there); AdamW's step lr·g/(|g| + 1e-8)
# turns such noise into a visible, unrepeatable update, so those weights are left out of the comparison.
SMALL = 1e-7
GENERAL = ["a blue square", "a green circle in the style of monet", "a picture of a yellow triangle",
           "a drawing of a star"]


@pytest.fixture(scope="module")
def setup(tiny):
    """The student's pruning (a quarter of every ff.net.2's input neurons), latents and prompts."""
    host, text = tiny
    unet = host.unet()
    changes, masks = {}, {}
    for name, mod in unet.named_modules():
        if name.endswith("ff.net.2"):
            m = torch.zeros(mod.weight.shape, dtype=torch.bool)
            m[:, 1::4] = True
            masks[name] = m
            index = m.reshape(-1).nonzero()[:, 0]
            changes[f"{UNET_PREFIX}{name}.weight"] = Change("mask", tuple(m.shape), {"index": index})
    g = torch.Generator().manual_seed(11)
    shape = latent_shape(host)
    latents = {"general": torch.randn((len(GENERAL), *shape), generator=g) * 0.8,
               "forget": torch.randn((3, *shape), generator=g) * 0.8}
    return Edit("structured-prune", "tiny", changes), masks, latents


def _cfg(**kw):
    base = dict(steps=1, erase_every=2, batch=3, n_prompts=3, lr_distill=1e-3, lr_erase=5e-3, param_set="noxattn",
                seed=4, official="bilevel")
    base.update(kw)
    return DistillConfig(**base)


def _run(host, text, student_edit, latents, cfg):
    return compute_distill_unlearn(host, text, student_edit, "red", cfg, distill_prompts=GENERAL, family="tiny",
                                   latents=dict(latents))


def _eps(unet, x, t, c):
    return unet(x, timesteps=t, context=c).float()


class _Reference:
    """BilevelUnetFineTuner on copies of the UNet: `lower_step` / `upper_step` as the official code."""

    def __init__(self, unet, ac, masks, c_gen, c_f, c_u, latents, cfg, train=None):
        self.ac, self.cfg = ac, cfg
        self.teacher = copy.deepcopy(unet).requires_grad_(False)
        self.student = copy.deepcopy(unet).requires_grad_(False)
        copy_norm_inputs(self.student)  # ComfyUI 2024 adds residuals in place; a copy keeps the backward possible
        named = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, m in masks.items():
                named[name + ".weight"].masked_fill_(m, 0.0)
        # the official student: every parameter of the pruned UNet; `train`: only these weights
        self.params = named if train is None else {n + ".weight": named[n + ".weight"] for n in train}
        for name, p in self.params.items():
            p.requires_grad_(True)
            mod = name[:-len(".weight")]
            if mod in masks:  # pruned channels do not exist in the official student
                keep = (~masks[mod]).float()
                p.register_hook(lambda grad, keep=keep: grad * keep)
        self.before = {n: p.detach().clone() for n, p in self.params.items()}
        groups = [{"params": list(self.params.values()), "lr": cfg.lr_distill, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-08)
        up = [{"params": list(self.params.values()), "lr": cfg.lr_erase, "weight_decay": 0.0}]
        self.upper_optimizer = torch.optim.AdamW(up, betas=(0.9, 0.999), eps=1e-08)
        self.act_s, self.act_t = {}, {}
        levels = level_outputs(unet)
        for acts, model in ((self.act_s, self.student), (self.act_t, self.teacher)):
            mods = dict(model.named_modules())
            for name, tag in levels.items():
                mods[name].register_forward_hook(lambda mod, inp, out, tag=tag, acts=acts: acts.__setitem__(tag, out))
        self.c_gen, self.c_f, self.c_u, self.latents = c_gen, c_f, c_u, latents
        self.g = torch.Generator().manual_seed(cfg.seed + 3)
        self.perm, self.perm_u = None, None
        self.pos, self.pos_u = 0, 0
        self.losses = {"distill": [], "erase": []}
        self.small = {}  # parameter name -> where a gradient so far was at round-off level

    def _rows(self, which):
        n = self.latents[which].shape[0]
        perm, pos = (self.perm, self.pos) if which == "general" else (self.perm_u, self.pos_u)
        if perm is None or pos >= n:
            perm, pos = torch.randperm(n, generator=self.g), 0
        rows = perm[pos:pos + self.cfg.batch]
        if which == "general":
            self.perm, self.pos = perm, pos + self.cfg.batch
        else:
            self.perm_u, self.pos_u = perm, pos + self.cfg.batch
        return rows

    def _noisy(self, which, rows):
        latents = self.latents[which][rows]
        noise = torch.randn(latents.shape, generator=self.g)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=self.g).long()
        a = self.ac[timesteps].view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise, noise, timesteps

    def lower_step(self):
        rows = self._rows("general")
        noisy_latents, noise, timesteps = self._noisy("general", rows)
        encoder_hidden_states = self.c_gen[rows]
        target = noise  # prediction_type epsilon
        with torch.no_grad():
            full_model_pred = _eps(self.teacher, noisy_latents, timesteps, encoder_hidden_states).detach()
        model_pred = _eps(self.student, noisy_latents, timesteps, encoder_hidden_states)
        snr = self.ac[timesteps] / (1 - self.ac[timesteps])  # compute_snr: (alpha / sigma) ** 2
        mse_loss_weights = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights).mean()
        loss = loss * 1.0
        block_loss = torch.tensor(0.0)
        for key in self.act_s:
            block_loss = block_loss + F.mse_loss(self.act_s[key], self.act_t[key].detach(), reduction="mean")
        block_loss = block_loss / len(self.act_s)
        loss = loss + 0.1 * block_loss
        loss = loss + 2.0 * F.mse_loss(model_pred.float(), full_model_pred.float(), reduction="mean")
        loss.backward()
        self._note_small()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.losses["distill"].append(loss.item())

    def upper_step(self):
        rows = self._rows("forget")
        noisy_latents, _, timesteps = self._noisy("forget", rows)
        encoder_hidden_states = self.c_f[rows]
        empty_encoder_hidden_states = self.c_u.expand_as(encoder_hidden_states)
        with torch.no_grad():
            full_model_pred_cond = _eps(self.teacher, noisy_latents, timesteps, encoder_hidden_states).detach()
            full_model_pred_uncond = _eps(self.teacher, noisy_latents, timesteps, empty_encoder_hidden_states).detach()
        model_pred = _eps(self.student, noisy_latents, timesteps, encoder_hidden_states)
        target = full_model_pred_uncond - (full_model_pred_cond - full_model_pred_uncond)
        distillation_loss = F.mse_loss(model_pred, target, reduction="mean")
        loss = 1.0 * distillation_loss
        loss.backward()
        self._note_small()
        self.upper_optimizer.step()
        self.upper_optimizer.zero_grad()
        self.losses["erase"].append(loss.item())

    def _note_small(self):
        for n, p in self.params.items():
            small = p.grad.abs() < SMALL
            self.small[n] = small if n not in self.small else self.small[n] | small

    def train(self, steps):
        for global_step in range(steps):
            self.lower_step()
            if (global_step + 1) % self.cfg.erase_every == 0:
                self.upper_step()
        return {n[:-len(".weight")]: (p.detach() - self.before[n]) for n, p in self.params.items()
                if n.endswith(".weight")}

    def conditioned(self, updates):
        """`updates` without the weights whose gradient was ever at round-off level (see the docstring)."""
        return {n: torch.where(self.small[n + ".weight"], 0.0, d) for n, d in updates.items()}


def _reference(host, text, masks, latents, cfg, train=None):
    forget = paired_prompts("red", cfg.n_prompts, cfg.seed, "tiny")[0]
    c_gen, c_f, c_u = (conditioning(host, text, p)[0].float() for p in (GENERAL, forget, [""]))
    ref = _Reference(host.unet(), host.alphas_cumprod().float(), masks, c_gen, c_f, c_u, latents, cfg, train)
    return ref, ref.train(cfg.steps)


def _updates(edit):
    return {k[len(UNET_PREFIX):-len(".weight")]: c.delta(dtype=torch.float32) for k, c in edit.changes.items()}


def _rel(a, b):
    num = sum(float((a.get(k, torch.zeros_like(v)) - v).pow(2).sum()) for k, v in b.items())
    return math.sqrt(num / sum(float(v.pow(2).sum()) for v in b.values()))


def _size(a):
    return math.sqrt(sum(float(v.pow(2).sum()) for v in a.values()))


def test_official_lower_step_is_the_official_one(tiny, setup):
    """One step: the official student trains every parameter; the pack the parameter set's weights. A
    first AdamW step moves each parameter by its own gradient, so the pack's weights move exactly as the
    official ones do, and the rest is what the pack leaves out."""
    host, text = tiny
    student_edit, masks, latents = setup
    cfg = _cfg()
    edit = _run(host, text, student_edit, latents, cfg)
    ref, every = _reference(host, text, masks, latents, cfg)
    names = select_targets(dict(host.unet().named_modules()), "noxattn")
    got, want = _updates(edit), {n: every[n] for n in names}
    assert set(got) == set(names) and all(c.kind == "delta" for c in edit.changes.values())
    raw = _rel(got, want)
    got, want = ref.conditioned(got), ref.conditioned(want)
    assert _rel(got, want) <= TOL
    for name, m in masks.items():  # pruned weights stay exactly zero
        assert not bool(got[name][m].any())
    assert edit.metrics["history"]["distill"][0] == pytest.approx(ref.losses["distill"][0], abs=1e-6)
    assert edit.params["official"] == "bilevel" and "BilevelUnetFineTuner" in edit.metrics["official_source"]
    full = {n: p.detach() - ref.before[n] for n, p in ref.params.items()}  # weights, biases, norms
    rest = {n: d for n, d in full.items() if n[:-len(".weight")] not in want or not n.endswith(".weight")}
    left = sum(int(ref.small[n + ".weight"].sum()) for n in names) / sum(want[n].numel() for n in names)
    print(f"\nmeasured bilevel lower step: pack vs reference {_rel(got, want):.2e} ({raw:.2e} with the {left:.2%} "
          f"round-off weights); share of the official update outside the parameter set's weights "
          f"{_size(rest) / _size(full):.3g}")


def test_official_schedule_and_upper_step(tiny, setup):
    """Two steps with erase_every 2: the official loop takes two distillation steps and an extra erase
    step after the second; the pack's default replaces the second with the erase step."""
    host, text = tiny
    student_edit, masks, latents = setup
    cfg = _cfg(steps=2)
    edit = _run(host, text, student_edit, latents, cfg)
    names = select_targets(dict(host.unet().named_modules()), "noxattn")
    ref, want = _reference(host, text, masks, latents, cfg, train=names)
    h = edit.metrics["history"]
    assert len(h["distill"]) == 2 and [i for i, _ in h["erase"]] == [1]
    assert h["distill"] == pytest.approx(ref.losses["distill"], abs=1e-6)
    assert h["erase"][0][1] == pytest.approx(ref.losses["erase"][0], abs=1e-6)
    got, want = ref.conditioned(_updates(edit)), ref.conditioned(want)
    assert _rel(got, want) <= TOL
    off = _run(host, text, student_edit, latents, _cfg(steps=2, official="off", param_set="lora", rank=4))
    ho = off.metrics["history"]
    assert len(ho["distill"]) == 1 and len(ho["erase"]) == 1
    assert all(c.kind == "lowrank" for c in off.changes.values())
    moved = _updates(off)
    rel = _rel(moved, want)
    print(f"\nmeasured bilevel 2 steps: pack vs reference {_rel(got, want):.2e}; off (LoRA, erase in place of "
          f"the 2nd step) vs official {rel:.3g}, size ratio {_size(moved) / _size(want):.3g}")
    assert rel > 0.5
    dense = _run(host, text, student_edit, latents, _cfg(steps=2, official="off"))
    rel_dense = _rel(_updates(dense), want)
    print(f"measured bilevel 2 steps, off on the same dense set vs official: {rel_dense:.3g}")
    assert rel_dense > 0.1


def test_warmup_is_constant_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = bilevel._warmup(opt, 3)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])  # diffusers' get_constant_schedule_with_warmup
    assert bilevel._warmup(opt, 0) is None


def test_loader_draws_epochs_without_replacement():
    g = torch.Generator().manual_seed(0)
    loader = bilevel._Loader(5, 2, g)
    rows = [loader.next().tolist() for _ in range(6)]
    assert [len(r) for r in rows] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(rows[:3], [])) == sorted(sum(rows[3:], [])) == list(range(5))


def test_official_names_what_it_ignores():
    with pytest.raises(InvalidInputError, match="official"):
        DistillConfig(official="unlearn-ft").validate()
    with pytest.raises(InvalidInputError, match="warmup_steps"):
        DistillConfig(warmup_steps=-1).validate()
    cfg = DistillConfig(official="bilevel", eta=2.0, feature_kd="blocks", keep_pruned="skip", rank=8)
    said = bilevel.official_warnings(cfg)
    assert [s.split("=")[0] for s in said] == ["official bilevel ignores eta", "official bilevel ignores feature_kd",
                                               "official bilevel ignores keep_pruned", "official bilevel ignores rank"]
    run = bilevel.official_config(cfg)
    assert (run.eta, run.feature_kd, run.keep_pruned, run.rank) == (1.0, "levels", "mask", 8)
    assert bilevel.official_warnings(DistillConfig(official="bilevel")) == []
    assert bilevel.official_config(DistillConfig()) == DistillConfig()


def test_node_takes_official(comfy, monkeypatch):
    from conceptedit.comfy_host.jobs import JobResult
    from conceptedit.nodes import nodes_distill
    seen = []

    def fake(name, student, clip, job, ctx=None):
        assert name == "distill_unlearn", name
        seen.append(job.settings)
        return JobResult(student, clip, Edit("distill-unlearn", "tiny", {},
                                             metrics={"history": {"distill": [1.0], "erase": [[0, 1.0]]}}), [])

    monkeypatch.setattr(nodes_distill, "run", fake)
    opt = nodes_distill.DistillUnlearn.INPUT_TYPES()["optional"]
    assert opt["official"][1]["options"] == list(OFFICIAL) and opt["official"][1]["default"] == "off"
    node = nodes_distill.DistillUnlearn()
    node.execute("S", "T", "CLIP", "red", "", 10, 10, 1e-6, "lora", 4, 0, official="bilevel", warmup_steps=250,
                 erase_lr=5e-6)
    node.execute("S", "T", "CLIP", "red", "", 10, 10, 1e-3, "lora", 4, 0)
    a, b = seen
    assert (a.official, a.warmup_steps, a.lr_distill, a.lr_erase) == ("bilevel", 250, 1e-6, 5e-6)
    assert (b.official, b.warmup_steps, b.lr_distill, b.lr_erase) == ("off", 0, 1e-3, 1e-3)

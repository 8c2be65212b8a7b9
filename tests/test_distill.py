"""Bilevel distill-and-unlearn as the official code (rezashkv/unlearn-ft) trains it: feature KD
averaged over the UNet's level outputs (weight 0.1), a Min-SNR-γ diffusion term, two AdamW; and
weights the student's pruning zeroed stay exactly zero through a trained LoRA, in the weights ComfyUI
computes with, after save/load, and in an exported LoRA."""
import pytest
import torch

from conceptedit.comfy_host import jobs
from conceptedit.comfy_host.patches import patched_weights
from conceptedit.comfy_host.view import apply_edit
from conceptedit.editing import arch
from conceptedit.editing.distill import bilevel
from conceptedit.editing.distill.bilevel import (compute_distill_unlearn, diffusion_loss, feature_kd, level_outputs,
                                                 min_snr_weights, pruned_entries)
from conceptedit.editing.distill.config import DistillConfig
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.export.lora import LoraExportConfig, edit_to_lora
from conceptedit.editing.hooks import trace_inputs, trace_outputs
from conceptedit.editing.hosts import RunContext
from helpers import random_clip, random_model
from test_unlearn import Host, Text, _assert_unchanged, _snapshot

TINY_LEVELS = ["down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2"]


def _unet(cfg, device="meta"):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(**cfg, device=device, operations=comfy.ops.disable_weight_init)


# SD1.5's block structure (4 levels, 2 res blocks, attention on the first three) at a CPU width
SD1_SMALL = dict(arch.SD1_UNET, model_channels=32, context_dim=64, num_heads=4)


# ---- the level outputs -------------------------------------------------------------------------------
def test_level_outputs_are_the_official_nine_on_sd1_and_seven_on_sdxl(comfy):
    sd1 = level_outputs(_unet(arch.SD1_UNET))
    assert sd1 == {"input_blocks.3.0": "down.0", "input_blocks.6.0": "down.1", "input_blocks.9.0": "down.2",
                   "input_blocks.11.0": "down.3", "middle_block.2": "mid", "output_blocks.2.1": "up.0",
                   "output_blocks.5.2": "up.1", "output_blocks.8.2": "up.2", "output_blocks.11.1": "up.3"}
    sdxl = level_outputs(_unet(arch.SDXL_UNET))
    assert list(sdxl.values()) == ["down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2"]
    assert list(level_outputs(_unet(arch.TINY_UNET)).values()) == TINY_LEVELS
    # a student with blocks removed (no middle block, fewer output transformers) keeps its levels
    student = dict(arch.TINY_UNET, transformer_depth_middle=-2, transformer_depth_output=[0, 1, 0, 0, 1])
    assert list(level_outputs(_unet(student)).values()) == ["down.0", "down.1", "down.2", "up.0", "up.1", "up.2"]
    with pytest.raises(InvalidInputError, match="feature_kd 'blocks'"):
        level_outputs(torch.nn.Linear(2, 2))


def test_level_hooks_read_what_comfyui_passes_between_blocks(comfy):
    """ComfyUI runs each TimestepEmbedSequential layer by layer (a hook on the block never fires); the
    hooked last layers give exactly the tensors its forward passes on: the input blocks' outputs
    (ComfyUI's own input_block_patch sees them) and, for the last up level, the input of `out`."""
    unet = _unet(SD1_SMALL, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    names = level_outputs(unet)
    mods = dict(unet.named_modules())
    got, seen, final = {}, {}, {}

    def after_input_block(h, opts):
        seen[opts["block"][1]] = h.clone()
        return h

    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad(), trace_outputs(mods, names, lambda n, o: got.__setitem__(names[n], o.clone())), \
            trace_inputs(mods, ["out.0"], lambda n, h: final.__setitem__("h", h.clone())):
        unet(x, timesteps=t, context=c, transformer_options={"patches": {"input_block_patch": [after_input_block]}})
    assert list(got) == ["down.0", "down.1", "down.2", "down.3", "mid", "up.0", "up.1", "up.2", "up.3"]
    for tag, block in zip(("down.0", "down.1", "down.2", "down.3"), (3, 6, 9, 11)):
        assert torch.equal(got[tag], seen[block]), tag
    assert torch.equal(got["up.3"], final["h"])
    assert [tuple(got[k].shape[-2:]) for k in ("down.0", "down.1", "down.2", "up.0", "up.1", "up.2")] == \
        [(4, 4), (2, 2), (1, 1), (2, 2), (4, 4), (8, 8)]  # each level ends after its resampler


# ---- the losses ----------------------------------------------------------------------------------------
def test_feature_kd_averages_the_paired_outputs_or_sums_them():
    s = {"down.0": torch.ones(2, 3), "mid": torch.zeros(2, 4), "up.0": torch.zeros(2, 5)}
    t = {"down.0": torch.zeros(2, 3), "mid": torch.full((2, 4), 2.0), "up.0": torch.zeros(2, 6)}  # up.0: other shape
    loss, pairs = feature_kd(s, t, "levels")
    assert pairs == ["down.0", "mid"] and float(loss) == pytest.approx((1 + 4) / 2)
    assert float(feature_kd(s, t, "blocks")[0]) == pytest.approx(5.0)
    assert feature_kd(s, {}, "levels")[1] == []


def test_min_snr_weights_and_the_weighted_diffusion_loss():
    ac = torch.tensor([0.99, 0.8, 0.5, 0.1])  # SNR 99, 4, 1, 1/9
    w = min_snr_weights(ac, torch.tensor([0, 1, 2, 3]), 5.0)
    assert torch.allclose(w, torch.tensor([5 / 99, 1.0, 1.0, 1.0]))
    eps = torch.zeros(4, 2, 2, 2)
    noise = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 2, 2, 2)  # per-sample MSE 1, 4, 9, 16
    assert float(diffusion_loss(eps, noise, w)) == pytest.approx((5 / 99 + 4 + 9 + 16) / 4)
    assert float(diffusion_loss(eps, noise, None)) == pytest.approx(30 / 4)


def test_config_validation_names_the_choices():
    with pytest.raises(InvalidInputError, match="keep_pruned"):
        DistillConfig(keep_pruned="maybe").validate()
    with pytest.raises(InvalidInputError, match="feature_kd"):
        DistillConfig(feature_kd="all").validate()
    with pytest.raises(InvalidInputError, match="min_snr_gamma"):
        DistillConfig(min_snr_gamma=-1).validate()
    assert DistillConfig(keep_pruned=False).validate().keep_pruned == "off"  # the earlier boolean
    d = DistillConfig()
    assert (d.feature_kd, d.w_feat, d.w_out, d.min_snr_gamma, d.weight_decay, d.keep_pruned) == \
        ("levels", 0.1, 2.0, 5.0, 0.0, "mask")


# ---- the trainer -----------------------------------------------------------------------------------------
def _ffn_keys(m):
    return [k for k in m.model_state_dict() if k.endswith("ff.net.2.weight")]


def _scattered_mask(m, every=7) -> Edit:
    """ConceptPrune's form: scattered weights of every ff.net.2 (no whole row or column)."""
    sd = m.model_state_dict()
    changes = {}
    for k in _ffn_keys(m):
        shape = tuple(sd[k].shape)
        changes[k] = Change("mask", shape, {"index": torch.arange(3, shape[0] * shape[1], every, dtype=torch.int64)})
    return Edit("concept_prune", "tiny", changes)


def _neuron_mask(m, fraction=0.25) -> Edit:
    """Whole input columns (neurons) of every ff.net.2, as the bench's structured pruning."""
    sd = m.model_state_dict()
    changes = {}
    for k in _ffn_keys(m):
        w = sd[k]
        mask = torch.zeros(w.shape, dtype=torch.bool)
        mask[:, : int(fraction * w.shape[1])] = True
        changes[k] = Change("mask", tuple(w.shape), {"index": mask.reshape(-1).nonzero()[:, 0]})
    return Edit("structured-prune", "tiny", changes)


def _cfg(**kw):
    base = dict(steps=4, erase_every=2, batch=2, n_prompts=2, gen_steps=2, rank=2, lr_distill=3e-2, lr_erase=3e-2)
    base.update(kw)
    return DistillConfig(**base)


def test_trainer_uses_level_kd_min_snr_and_two_adamw(comfy, monkeypatch):
    m = random_model()
    snap = _snapshot(m)
    host, text = Host(m), Text()
    calls, weights, opts = [], [], []
    real_kd, real_snr, real_adamw = bilevel.feature_kd, bilevel.min_snr_weights, torch.optim.AdamW

    def kd(s, t, mode="levels"):
        loss, pairs = real_kd(s, t, mode)
        calls.append((sorted(s), sorted(t), mode, float(loss.detach())))
        return loss + 7.0, pairs  # a known feature term: the total shows the weight it gets

    def snr(ac, t, gamma):
        weights.append((gamma, real_snr(ac, t, gamma)))
        return weights[-1][1]

    class AdamW(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opts.append(self)

    monkeypatch.setattr(bilevel, "feature_kd", kd)
    monkeypatch.setattr(bilevel, "min_snr_weights", snr)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    edit = compute_distill_unlearn(host, text, _neuron_mask(m), "circle", _cfg(steps=3, erase_every=3), family="tiny")
    h = edit.metrics["history"]
    assert len(h["distill"]) == 2 and len(h["erase"]) == 1 and len(calls) == 2
    assert all(s == t == sorted(TINY_LEVELS) and mode == "levels" and real > 0 for s, t, mode, real in calls)
    assert edit.metrics["kd_outputs"] == TINY_LEVELS
    for total, (l_diff, l_out, l_feat) in zip(h["distill"], h["distill_terms"]):
        assert l_feat >= 7 and total == pytest.approx(l_diff + 2.0 * l_out + 0.1 * l_feat, abs=2e-5)
    assert [g for g, _ in weights] == [5.0, 5.0] and all(bool((w <= 1).all()) for _, w in weights)
    assert len(opts) == 2 and all(isinstance(o, real_adamw) for o in opts)
    for o, lr in zip(opts, (3e-2, 3e-2)):
        group = o.param_groups[0]
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (lr, (0.9, 0.999), 1e-8, 0.0)
    _assert_unchanged(m, snap)


def test_old_feature_kd_over_transformer_blocks_and_no_min_snr_stay_available(comfy, monkeypatch):
    m = random_model()
    host, text = Host(m), Text()
    calls = []
    real_kd = bilevel.feature_kd
    monkeypatch.setattr(bilevel, "feature_kd", lambda s, t, mode="levels": calls.append((sorted(s), mode))
                        or real_kd(s, t, mode))
    monkeypatch.setattr(bilevel, "min_snr_weights", lambda *a: pytest.fail("Min-SNR is off"))
    edit = compute_distill_unlearn(host, text, _neuron_mask(m), "circle",
                                   _cfg(steps=1, erase=False, feature_kd="blocks", min_snr_gamma=0), family="tiny")
    blocks = sorted(n for n in dict(m.model.diffusion_model.named_modules())
                    if n.rsplit(".", 2)[-2:-1] == ["transformer_blocks"])
    assert calls == [(blocks, "blocks")] and sorted(edit.metrics["kd_outputs"]) == blocks


# ---- pruned weights stay pruned -----------------------------------------------------------------------
def _applied(model, edits, keys):
    for e in edits:
        model, _, _ = apply_edit(model, None, e)
    return patched_weights(model, keys)


def test_pruned_weights_stay_exactly_zero_with_a_lora(comfy, tmp_path):
    """A ConceptPrune-style (scattered) mask: the LoRA is masked in training and those layers fold back
    as dense ΔW that is 0 where pruned, so the weights ComfyUI computes with keep every pruned weight at
    exactly 0 (also after save/load and in a 'diff' LoRA export); without keep_pruned they regrow."""
    m = random_model()
    snap = _snapshot(m)
    host, text = Host(m), Text()
    student = _scattered_mask(m)
    keys = sorted(student.changes)
    latents = {}
    edit = compute_distill_unlearn(host, text, student, "circle", _cfg(), family="tiny", latents=latents)
    assert edit.metrics["pruned_layers"] == sorted(k[len("diffusion_model."):-len(".weight")] for k in keys)
    assert all(edit.changes[k].kind == "delta" for k in keys)
    assert any(c.kind == "lowrank" for k, c in edit.changes.items() if k not in keys)  # the other layers: LoRA
    loaded = Edit.load(edit.save(tmp_path / "distilled.safetensors"))
    before = patched_weights(m, keys)
    for e in (edit, loaded):
        w = _applied(m, [student, e], keys)
        for k in keys:
            pruned = student.changes[k].mask()
            assert torch.all(w[k][pruned] == 0), k
            assert not torch.equal(w[k][~pruned], before[k][~pruned])  # the kept weights did train
    sd, _ = edit_to_lora(edit, LoraExportConfig(dense_as="diff", dtype="float32"))
    fam = arch.get_family("tiny")
    assert all(torch.all(sd[f"{fam.to_kohya(k)}.diff"][student.changes[k].mask()] == 0) for k in keys)
    # the earlier behaviour: the LoRA regrows pruned weights
    free = compute_distill_unlearn(host, text, student, "circle", _cfg(keep_pruned="off"), family="tiny",
                                   latents=latents)
    w = _applied(m, [student, free], keys)
    assert any(bool((w[k][student.changes[k].mask()] != 0).any()) for k in keys)
    _assert_unchanged(m, snap)


def test_neuron_pruning_folds_back_low_rank_and_skip_leaves_pruned_layers(comfy):
    m = random_model()
    host, text = Host(m), Text()
    student = _neuron_mask(m)
    keys = sorted(student.changes)
    latents = {}
    edit = compute_distill_unlearn(host, text, student, "circle", _cfg(), family="tiny", latents=latents)
    assert all(edit.changes[k].kind == "lowrank" for k in keys)  # whole neurons: still a small LoRA pair
    w = _applied(m, [student, edit], keys)
    for k in keys:
        assert torch.all(w[k][student.changes[k].mask()] == 0) and bool(w[k].any())
    sd, _ = edit_to_lora(edit)  # the default SVD export keeps them: exact low-rank pairs
    for k in keys:
        name = arch.get_family("tiny").to_kohya(k)
        up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
        assert torch.all((up @ down)[student.changes[k].mask()] == 0)
    skipped = compute_distill_unlearn(host, text, student, "circle", _cfg(keep_pruned="skip"), family="tiny",
                                      latents=latents)
    assert skipped.changes and not set(skipped.changes) & set(keys)


def test_pruned_entries_are_what_the_pruning_zeroed():
    lin = {"a": torch.nn.Linear(100, 100, bias=False), "b": torch.nn.Linear(100, 100, bias=False)}
    with torch.no_grad():
        lin["a"].weight.view(-1)[:3] = 0.0  # zero in the base: not zeroed by the pruning
    w = lin["a"].weight.detach()
    delta = torch.zeros(100, 100)
    delta.view(-1)[10:20] = -w.view(-1)[10:20]  # a patched student read off as a model difference
    key = "diffusion_model.a.weight"
    got = pruned_entries(Edit("model-difference", "tiny", {key: Change("delta", (100, 100), {"delta": delta})}),
                         lin, ["a", "b"], None, {"a": delta})
    assert list(got) == ["a"] and got["a"].view(-1).nonzero()[:, 0].tolist() == list(range(10, 20))
    # a student model of its own: exact zeros count only in a layer that is visibly pruned
    with torch.no_grad():
        lin["b"].weight[:, :5] = 0.0
    got = pruned_entries(None, lin, ["a", "b"], None, {})
    assert list(got) == ["b"] and int(got["b"].sum()) == 500


def test_the_distill_job_keeps_a_concept_prune_students_zeros(comfy):
    """The node's route: the student is the teacher with ConceptPrune's mask as patches (read off as
    a model difference); the returned student MODEL computes with exactly 0 at every pruned weight."""
    teacher, clip = random_model(seed=4), random_clip(5)
    mask = _scattered_mask(teacher, every=5)
    student, _, _ = apply_edit(teacher, clip, mask)
    cfg = _cfg(steps=2)
    out = jobs.run("distill_unlearn", student, clip, jobs.DistillJob(teacher=teacher, concept="red", settings=cfg,
                                                                     width=64, height=64), RunContext())
    keys = sorted(mask.changes)
    w = patched_weights(out.model, keys)
    assert all(torch.all(w[k][mask.changes[k].mask()] == 0) for k in keys)
    assert all(out.edit.changes[k].kind == "delta" for k in keys if k in out.edit.changes)
    assert set(out.edit.changes) - set(keys) and not teacher.patches


def test_the_official_loop_is_refused_under_torchrun(comfy, monkeypatch):
    """`official="bilevel"` follows a one-process script: with a process group it is refused before
    any picture is drawn (the data-parallel form is `official="off"`)."""
    from conceptedit.editing import distributed
    m = random_model()
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(bilevel, "generate_latents", lambda *a, **k: pytest.fail("drew pictures before refusing"))
    with pytest.raises(InvalidInputError, match="one-process script"):
        compute_distill_unlearn(Host(m), Text(), _scattered_mask(m), "circle", _cfg(official="bilevel"), family="tiny")


def test_the_command_line_distils_a_student_checkpoint_of_its_own(comfy, tmp_path):
    """`conceptedit distill --student CKPT`: a student model of its own read through the teacher's text
    encoder (here the tiny model as both, distillation only); the file is the trained part."""
    from conceptedit.cli import main
    out = tmp_path / "d.safetensors"
    with torch.inference_mode(False):
        assert main(["distill", "--ckpt", "tiny", "--cpu", "--student", "tiny", "--steps", "2", "--n-prompts", "2",
                     "--gen-steps", "2", "--batch", "2", "--distill-prompt", "a blue square", "--out", str(out)]) == 0
    edit = Edit.load(str(out))
    assert edit.method == "distill" and edit.concepts == [] and edit.changes
    assert len(edit.metrics["history"]["distill"]) == 2 and not edit.metrics["history"]["erase"]
    assert edit.params["separate_student"] is True

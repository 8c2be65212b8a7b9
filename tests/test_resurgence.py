"""The resurgence audit, the classifier-free presence measure, distill-and-unlearn, and the plots."""
import math

import pytest
import torch

from conceptedit.editing.report import plots
from conceptedit.editing.distill.bilevel import DistillConfig, compute_distill_unlearn
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.audit.resurgence import AuditConfig, audit, guidance_presence, resurgence_ratio
from conceptedit.editing.unlearn.trainer import UnlearnConfig, compute_unlearn
from helpers import random_model
from test_unlearn import Host, Text, _assert_unchanged, _snapshot


def test_resurgence_ratio():
    assert resurgence_ratio(0.9, 0.1, 0.1) == 0.0
    assert resurgence_ratio(0.9, 0.1, 0.9) == pytest.approx(1.0)
    assert resurgence_ratio(0.9, 0.1, 0.5) == pytest.approx(0.5)
    assert resurgence_ratio(1.0, 0.0, -0.2) == pytest.approx(-0.2)  # even further erased
    assert math.isnan(resurgence_ratio(0.5, 0.5, 0.7))  # the edit removed nothing: no ratio


def _edit_on(name, shape, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    key = f"diffusion_model.{name}.weight"
    return Edit("toy", "tiny", {key: Change("delta", shape, {"delta": scale * torch.randn(shape, generator=g)})})


def test_audit_math_on_toy_presence(comfy):
    """presence = 1 for the original, 0.2 after the edit, and climbs with the fine-tune's size."""
    m = random_model()
    snap = _snapshot(m)
    host, text = Host(m), Text()
    name = "middle_block.1.transformer_blocks.0.attn2.to_v"
    mods = dict(m.model.diffusion_model.named_modules())
    edit = _edit_on(name, tuple(mods[name].weight.shape))
    seen = []

    def presence(edits):
        seen.append([e.method for e, _ in edits])
        if not edits:
            return 1.0
        ft = [e for e, _ in edits if e.method == "benign-finetune"]
        size = sum(float(c.delta(dtype=torch.float32).norm()) for e in ft for c in e.changes.values())
        return 0.2 + min(0.8, 0.01 * size)

    rep = audit(host, text, edit, presence, AuditConfig(checkpoints=(3, 1), batch=2, gen_steps=2, lr=1e-2),
                benign_prompts=["a house", "a tree"])
    assert seen[:2] == [[], ["toy"]] and all(s == ["toy", "benign-finetune"] for s in seen[2:])
    assert rep.steps == [1, 3] and len(rep.loss) == 3
    assert rep.presence_original == 1.0 and rep.presence_edited == pytest.approx(0.2)
    for p, r in zip(rep.presence_after, rep.resurgence):
        assert r == pytest.approx((p - 0.2) / 0.8)
    assert rep.presence_after[1] > rep.presence_after[0] > 0.2  # the LoRA grew, so did "presence"
    assert "resurgence" in rep.to_text() and "original 1.000" in rep.to_text()
    _assert_unchanged(m, snap)


def test_audit_of_a_text_encoder_edit_needs_the_edited_encoder(comfy):
    """A text-encoder edit (EMCID) is refused unless the caller says `text` is the edited encoder;
    then only the UNet LoRA trains, presence sees the whole edit, and the host is unchanged."""
    m = random_model()
    snap = _snapshot(m)
    host, text = Host(m), Text()
    key = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight"
    edit = Edit("emcid", "tiny", {key: Change("delta", (64, 256), {"delta": torch.ones(64, 256)})})
    cfg = AuditConfig(checkpoints=(2,), batch=2, gen_steps=2)
    with pytest.raises(InvalidInputError, match="text encoder"):
        audit(host, text, edit, lambda edits: 1.0, cfg, benign_prompts=["a house"])
    seen = []

    def presence(edits):
        seen.append(sorted(k for e, _ in edits for k in e.changes))
        return 0.0 if edits else 1.0

    rep = audit(host, text, edit, presence, cfg, benign_prompts=["a house"], text_is_edited=True)
    assert seen[1] == [key] and key in seen[2] and len(seen[2]) > 1  # the edit, then edit + UNet LoRA
    assert all(k == key or k.startswith("diffusion_model.") for k in seen[2])
    assert rep.presence_after == [0.0] and rep.resurgence == [0.0]
    _assert_unchanged(m, snap)


def test_audit_config_validation():
    with pytest.raises(InvalidInputError, match="checkpoint"):
        AuditConfig(checkpoints=(0,)).validate()
    assert AuditConfig(checkpoints=(50, 10, 10)).validate().checkpoints == (10, 50)


def test_guidance_presence_is_one_for_original_and_drops_for_esd(comfy):
    m = random_model()
    host, text = Host(m), Text()
    pres = guidance_presence(host, text, ["a red circle", "a circle by monet"], n_t=2, gen_steps=2)
    assert pres([]) == pytest.approx(1.0)
    cfg = UnlearnConfig(method="esd", param_set="xattn", steps=6, lr=3e-3, batch=2, n_prompts=2, gen_steps=2, eta=2.0)
    edit = compute_unlearn(host, text, "circle", cfg, family="tiny")
    assert pres([(edit, 1.0)]) < 0.9
    # strength 0 of any edit is the original
    assert pres([(edit, 0.0)]) == pytest.approx(1.0, abs=1e-5)


def test_distill_unlearn_alternates_and_keeps_pruned_weights(comfy):
    m = random_model()
    snap = _snapshot(m)
    host, text = Host(m), Text()
    mods = dict(m.model.diffusion_model.named_modules())
    name = "middle_block.1.transformer_blocks.0.attn2.to_k"
    shape = tuple(mods[name].weight.shape)
    idx = torch.arange(0, shape[0] * shape[1], 3, dtype=torch.int64)  # prune every third weight
    student = Edit("prune", "tiny", {f"diffusion_model.{name}.weight": Change("mask", shape, {"index": idx})})
    cfg = DistillConfig(steps=4, erase_every=2, param_set="xattn", batch=2, n_prompts=2, gen_steps=2, lr_distill=1e-3)
    out = compute_distill_unlearn(host, text, student, "circle", cfg, family="tiny")
    h = out.metrics["history"]
    assert len(h["distill"]) == 2 and [s for s, _ in h["erase"]] == [1, 3]
    d = out.changes[f"diffusion_model.{name}.weight"].delta(dtype=torch.float32).reshape(-1)
    assert torch.all(d[idx] == 0) and bool(d.abs().sum() > 0)  # pruned weights stay pruned
    _assert_unchanged(m, snap)


def test_plots_are_comfy_images():
    img = plots.line_plot({"forget": [1.0, 0.5, None, 0.2], "retain": [(0, 0.3), (3, 0.4)]}, title="t",
                          hlines={"orig": 0.9})
    assert img.shape == (1, 360, 640, 3) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 1 and float(img.std()) > 0.01
    h = plots.history_plot({"forget": [float(i) for i in range(50)], "retain": [None] * 50, "dot": [0.0] * 50})
    assert h.shape[-1] == 3

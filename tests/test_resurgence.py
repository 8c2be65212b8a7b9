"""The resurgence audit, the classifier-free presence measure, distill-and-unlearn, and the plots."""
import math

import pytest
import torch

from conceptedit.editing.report import plots
from conceptedit.editing.distill.bilevel import compute_distill_unlearn
from conceptedit.editing.distill.config import DistillConfig
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.audit.resurgence import AuditConfig, audit, guidance_presence, resurgence_ratio
from conceptedit.editing.unlearn.trainer import compute_unlearn
from conceptedit.editing.unlearn.config import UnlearnConfig
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


# ---- the user's own benign images ------------------------------------------------------------------
def test_audit_trains_on_given_images_and_says_so(comfy):
    """Given latents are fine-tuned on with their own captions (one each, or one for all); a caption
    count that matches neither, or NaN latents, is refused before any training."""
    from conceptedit.editing.audit.resurgence import captions_for
    m = random_model()
    host, text = Host(m), Text()
    name = "middle_block.1.transformer_blocks.0.attn2.to_v"
    edit = _edit_on(name, tuple(dict(m.model.diffusion_model.named_modules())[name].weight.shape))
    x = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = AuditConfig(checkpoints=(1,), batch=2, gen_steps=2)
    rep = audit(host, text, edit, lambda edits: 1.0 - 0.5 * bool(edits), cfg, benign_prompts=["a house"],
                benign_latents=x, benign_data="3 photos")
    assert rep.benign_data == "3 photos" and "benign fine-tuning data: 3 photos" in rep.to_text()
    assert captions_for(["a", "b", "c"], 3) == ["a", "b", "c"] and captions_for(["a"], 2) == ["a", "a"]
    with pytest.raises(InvalidInputError, match="3 benign images but 2 captions"):
        audit(host, text, edit, lambda edits: 1.0, cfg, benign_prompts=["a", "b"], benign_latents=x)
    with pytest.raises(InvalidInputError, match="NaN"):
        audit(host, text, edit, lambda edits: 1.0, cfg, benign_prompts=["a"], benign_latents=x * float("nan"))
    generated = audit(host, text, edit, lambda edits: 1.0 - 0.5 * bool(edits), cfg, benign_prompts=["a house"])
    assert "generated" in generated.benign_data


def test_fit_image_crops_to_the_aspect_and_resizes():
    from conceptedit.comfy_host.images import fit_image
    img = torch.zeros(20, 40, 3)
    img[:, 10:30] = 1.0  # the centre square of a 2:1 picture is white, its sides black
    out = fit_image(img, 8, 8)
    assert out.shape == (8, 8, 3) and torch.allclose(out, torch.ones_like(out))
    assert fit_image(torch.rand(9, 9, 4), 16, 32).shape == (16, 32, 3)  # alpha dropped, wider kept
    with pytest.raises(InvalidInputError, match="expected an image"):
        fit_image(torch.rand(9, 9), 8, 8)


def test_audit_job_encodes_connected_and_folder_images_with_the_vae(comfy, tmp_path):
    """The host path: an IMAGE batch and a folder (PNG + .txt captions) go through the checkpoint's VAE
    and ComfyUI's process_latent_in into the benign fine-tune; the report names them."""
    import numpy as np
    from PIL import Image

    from conceptedit.comfy_host import audits
    from conceptedit.comfy_host import images as image_io
    from conceptedit.comfy_host.view import ModelView
    from conceptedit.tiny.comfy_model import tiny_vae
    from helpers import random_clip
    vae = tiny_vae()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(300, 200, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(np.asarray(pixels)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"a house number {i}\n")
    clip = random_clip()
    name = "middle_block.1.transformer_blocks.0.attn2.to_v"
    with torch.inference_mode():
        model = random_model()
        edit = _edit_on(name, tuple(dict(model.model.diffusion_model.named_modules())[name].weight.shape))
        view = ModelView(model, clip)
        images, captions = image_io.load_image_folder(str(tmp_path))
        assert captions == ["a house number 0", "a house number 1"] and images[0].shape == (300, 200, 3)
        z = image_io.encode_images(view, vae, images)
        lh, lw = view.denoiser.latent_size
        fitted = torch.stack([image_io.fit_image(im, 8 * lh, 8 * lw) for im in images])
        assert z.shape == (2, 4, lh, lw)
        assert torch.allclose(z, model.model.process_latent_in(vae.encode(fitted)))
        connected = torch.rand(3, 64, 64, 3, generator=g)
        cfg = AuditConfig(checkpoints=(1,), batch=2, gen_steps=1)
        rep = audits.audit_models(model, model, clip, ["a red circle"], ["a tree"], cfg, edit, vae=vae,
                                benign_images=connected, benign_folder=str(tmp_path))
    assert rep.benign_data == f"5 user images (3 connected + 2 from {tmp_path})", rep.benign_data
    assert "user images" in rep.to_text() and len(rep.steps) == 1
    with pytest.raises(InvalidInputError, match="VAE"):
        with torch.inference_mode():
            audits.audit_models(model, model, clip, ["a red circle"], ["a tree"], cfg, edit, benign_images=connected)
    with pytest.raises(InvalidInputError, match="3 benign images but 2 captions"):
        with torch.inference_mode():
            audits.audit_models(model, model, clip, ["a red circle"], ["a", "b"], cfg, edit, vae=vae,
                              benign_images=connected)
    (tmp_path / "img1.txt").unlink()
    with pytest.raises(InvalidInputError, match="have no caption"):
        image_io.load_image_folder(str(tmp_path))
    with pytest.raises(InvalidInputError, match="no folder"):
        image_io.load_image_folder(str(tmp_path / "nothing"))


def test_concept_twins_take_out_every_concept_and_fall_back_on_empty():
    from conceptedit.editing.audit.presence import concept_twins
    prompts = ["a red circle", "a circle by monet", "red", "a crimson star"]
    assert concept_twins(prompts, ["red -> purple", "monet"]) == ["a circle", "a circle by", "", ""]
    assert concept_twins(prompts, []) == ["", "", "", ""]


def test_guidance_presence_against_concept_free_twins(comfy):
    """With the concept's words named, each prompt is measured against its concept-free twin: a
    text encoder that reads 'a red circle' exactly as 'a circle' (a perfect erasure of red) scores 0,
    where against the empty prompt it keeps most of its score, the circle's share, which no erasure
    of red should remove."""
    from conceptedit.editing.audit.presence import concept_free

    class Erased(Text):  # the text encoder after the erasure
        def encode(self, prompts):
            return super().encode([concept_free(p, "red") for p in prompts])

    m = random_model()
    host, text = Host(m), Text()
    prompts = ["a red circle", "a red square"]
    te_key = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight"
    erased = Edit("toy", "tiny", {te_key: Change("delta", (4, 4), {"delta": torch.zeros(4, 4)})})
    twin = guidance_presence(host, text, prompts, n_t=2, gen_steps=2, edited_text=Erased(), concepts=["red"])
    empty = guidance_presence(host, text, prompts, n_t=2, gen_steps=2, edited_text=Erased())
    assert twin([]) == pytest.approx(1.0) and empty([]) == pytest.approx(1.0)
    assert abs(twin([(erased, 1.0)])) < 1e-5
    assert empty([(erased, 1.0)]) > 0.3

"""Every node on every layout of the matrix (tests/layouts.py), inside the real ComfyUI: the layout is
read from the model, each method computes, applies to a clone and samples one step; the trainers
run two steps; the LoRA export is read back by ComfyUI's own LoraLoader."""
from __future__ import annotations

import os

import pytest
import torch

from conceptedit.comfy_host.patches import model_family, model_fingerprint
from conceptedit.comfy_host.audits import audit_models
from conceptedit.editing.audit.resurgence import AuditConfig
from layouts import SPECS, build


def _node(comfy, node_id, **given):
    """Run a ConceptEdit node with its declared defaults for every input not given."""
    cls = comfy.NODE_CLASS_MAPPINGS[node_id]
    kwargs = {}
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            if name in given:
                kwargs[name] = given[name]
            elif len(spec) > 1 and "default" in spec[1]:
                kwargs[name] = spec[1]["default"]
            elif isinstance(spec[0], (list, tuple)):
                kwargs[name] = spec[0][0]
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def _sample_one_step(comfy, model, clip):
    pos = comfy.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = comfy.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    if model.model.diffusion_model.in_channels > 4:  # an inpainting UNet repaints under a mask
        latent = comfy.SetLatentNoiseMask().set_mask(latent, torch.ones(1, 64, 64))[0]
    out = comfy.common_ksampler(model, 0, 1, 2.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert torch.isfinite(out).all()
    return out


def _patched_keys(model):
    return {k for k in model.patches if model.patches[k]}


@pytest.mark.parametrize("name", sorted(SPECS))
@torch.inference_mode()
def test_every_node_on_every_layout(comfy, name, tmp_path):
    import folder_paths

    old_loras = folder_paths.folder_names_and_paths.get("loras")
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path)], set(folder_paths.supported_pt_extensions))
    try:
        _matrix_case(comfy, name, folder_paths)
    finally:
        if old_loras is not None:
            folder_paths.folder_names_and_paths["loras"] = old_loras
        else:
            folder_paths.folder_names_and_paths.pop("loras", None)


def _matrix_case(comfy, name, folder_paths):
    model, clip, spec = build(name)
    layout = model_family(model, clip)
    real = sum(1 for k, _ in model.model.diffusion_model.named_modules() if k.endswith(".attn2"))
    assert len(layout.blocks) == real == spec.blocks and layout.name == "custom"
    assert layout.context_dim == spec.unet["context_dim"]
    assert [t.name for t in layout.text_encoders] == [f"clip_{n}" for n, _ in spec.clip]
    before = _sample_one_step(comfy, model, clip)

    # closed form on attn2 K/V
    m_uce, e_uce = _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=clip, concepts="red")
    assert _patched_keys(m_uce) == set(e_uce.changes) and len(e_uce.changes) == 2 * spec.blocks
    assert not model.patches
    assert not torch.equal(_sample_one_step(comfy, m_uce, clip), before)

    # skilled-neuron pruning (calibration at 64×64 px: these layouts' native 512/1024 px is slow on a CPU)
    m_cp, e_cp, _ = _node(comfy, "ConceptEditConceptPrune", model=model, clip=clip, concepts="red", preset="custom",
                          pairs="a {concept} circle | a circle", skill_ratio=0.05, tau=2, steps=2, cfg=2.0,
                          batch_size=2, width=64, height=64)
    assert set(e_cp.changes) == set(layout.ffn_out_keys()) and _patched_keys(m_cp) == set(e_cp.changes)
    _sample_one_step(comfy, m_cp, clip)

    # text encoder (EMCID stage 2) on every encoder the CLIP has
    c_em, e_em, _ = _node(comfy, "ConceptEditTextEncoderEdit", clip=clip, model=model, concepts="red -> blue",
                          lam=300.0, steps=2, use_stage1=False)
    assert {k.split(".", 1)[0] for k in e_em.changes} == {t.name for t in layout.text_encoders}
    assert c_em is not clip and not clip.patcher.patches
    _sample_one_step(comfy, model, c_em)

    # red-team audit: one step of each prompt attack against the UNet edit, the prefix against the text edit
    for edited, edit, edited_clip, on in ((m_uce, e_uce, None, (True, True, True)), (model, e_em, c_em, (True, False, False))):
        res = _node(comfy, "ConceptEditRedTeamAudit", edited_model=edited, original_model=model, clip=clip,
                    concept="red", concept_prompts="a red circle", prefix=on[0], embedding_match=on[1],
                    inversion=on[2], steps=1, samples=1, sample_steps=2, cfg=2.0, edit=edit,
                    edited_clip=edited_clip, width=64, height=64)
        text, grid, success = res.result
        assert text.count(" steps, ") == sum(on) and grid.shape[0] == 1 and 0.0 <= success <= 1.0
    assert not model.patches and not clip.patcher.patches

    # training: RGD for two steps on the layout's own prediction type and conditioning
    m_un, e_un, _ = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", method="rgd",
                          steps=2, rank=2, batch=2, n_prompts=2, gen_steps=2, width=64, height=64)
    assert e_un.changes and all(torch.isfinite(c.delta(dtype=torch.float32)).all() for c in e_un.changes.values())
    _sample_one_step(comfy, m_un, clip)
    report = audit_models(m_uce, model, clip, ["a red circle"], ["a house"],
                          AuditConfig(checkpoints=(1,), batch=2, gen_steps=2, rank=2), edit=e_uce, latent=(8, 8))
    assert report.steps == [1] and all(p == p for p in report.presence_after)

    # shared files: save, load, apply with validation, export as LoRA and read back by LoraLoader
    _node(comfy, "ConceptEditSaveEdit", edit=e_uce, filename=f"matrix_{name}")
    loaded, _ = _node(comfy, "ConceptEditLoadEdit", edit_name=f"matrix_{name}.safetensors")
    m_ap, _, _ = _node(comfy, "ConceptEditApplyEdit", model=model, edit=loaded, strength=1.0)
    assert _patched_keys(m_ap) == set(e_uce.changes)
    for edit in (e_uce, e_em):
        lora = f"matrix_{name}_{edit.method}"
        _node(comfy, "ConceptEditExportLoRA", edit=edit, filename=lora)
        path = folder_paths.get_full_path("loras", f"{lora}.safetensors")
        assert path and os.path.isfile(path)
        lm, lc = comfy.LoraLoader().load_lora(model, clip, f"{lora}.safetensors", 1.0, 1.0)
        got = _patched_keys(lm) | _patched_keys(lc.patcher)
        assert got == set(edit.changes), (name, sorted(set(edit.changes) - got)[:3])


@torch.inference_mode()
def test_an_edit_for_one_custom_layout_is_refused_on_another(comfy):
    from conceptedit.editing.errors import FingerprintMismatchError

    a, clip_a, _ = build("sd1_like")
    b, _, _ = build("student")
    _, edit = _node(comfy, "ConceptEditCrossAttentionEdit", model=a, clip=clip_a, concepts="red")
    assert edit.family == "custom" and edit.fingerprint["layout"] != model_fingerprint(b)["layout"]
    with pytest.raises(FingerprintMismatchError, match="different layout"):
        _node(comfy, "ConceptEditApplyEdit", model=b, edit=edit, strength=1.0)
    assert not b.patches
    # the same layout with other weights applies, with a warning
    a2, _, _ = build("sd1_like", seed=5)
    _, _, warnings = _node(comfy, "ConceptEditApplyEdit", model=a2, edit=edit, strength=1.0)
    assert "different checkpoint" in warnings


@torch.inference_mode()
def test_distill_node_trains_a_pruned_and_a_smaller_student(comfy):
    teacher, clip, _ = build("sd1_like")
    small, _, _ = build("student", seed=3)  # blocks removed; reads the teacher's CLIP
    pruned, _, _ = _node(comfy, "ConceptEditConceptPrune", model=teacher, clip=clip, concepts="red", preset="custom",
                         pairs="a {concept} circle | a circle", skill_ratio=0.05, tau=2, steps=2, cfg=2.0,
                         batch_size=2, width=64, height=64)
    for student in (pruned, small):
        patches_before = dict(student.patches)
        out, edit, plot = _node(comfy, "ConceptEditDistillUnlearn", student=student, teacher=teacher, clip=clip,
                                concept="red", steps=4, erase_every=2, rank=2, batch=2, n_prompts=2, gen_steps=2,
                                width=64, height=64)
        hist = edit.metrics["history"]
        assert len(hist["distill"]) == 2 and len(hist["erase"]) == 2 and plot.ndim == 4
        assert edit.changes and all(k in set(_patched_keys(out)) for k in edit.changes)
        assert student.patches == patches_before and not teacher.patches
        _sample_one_step(comfy, out, clip)
    assert edit.params["separate_student"] and edit.family == "custom"

"""Apply/Save/Load nodes on a real ComfyUI ModelPatcher: the input is never changed, strength 0 is
the identity, and a wrong-family edit is refused before anything is applied."""
import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import FingerprintMismatchError
from conceptedit.comfy_host.patches import model_fingerprint
from helpers import random_model


def _weights_after_load(patcher):
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _edit_for(model, family="tiny"):
    fam = arch.get_family(family)
    shapes = fam.expected_shapes()
    kk, kf = fam.attn2_kv_keys()[0], fam.ffn_out_keys()[0]
    g = torch.Generator().manual_seed(1)
    return Edit("uce+concept_prune", family, {
        kk: Change("lowrank", shapes[kk], {"up": torch.randn(shapes[kk][0], 1, generator=g),
                                           "down": torch.randn(1, shapes[kk][1], generator=g)}),
        kf: Change("mask", shapes[kf], {"index": torch.arange(0, 50, dtype=torch.int64)}),
    }, fingerprint=model_fingerprint(model) if model is not None else {})


@torch.inference_mode()
def test_apply_edit_node_patches_a_clone(comfy):
    model = random_model()
    base = _weights_after_load(model)
    edit = _edit_for(model)
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditApplyEdit"]()
    m2, _clip, warnings = node.execute(model, edit, 1.0)
    assert m2 is not model and warnings == ""
    after = _weights_after_load(m2)
    fam = arch.get_family("tiny")
    kk = fam.attn2_kv_keys()[0][len("diffusion_model."):]
    kf = fam.ffn_out_keys()[0][len("diffusion_model."):]
    ch = edit.changes[fam.attn2_kv_keys()[0]]
    assert torch.allclose(after[kk], base[kk] + ch.delta(), atol=1e-6)
    assert torch.all(after[kf].reshape(-1)[:50] == 0)
    assert torch.equal(after[kf].reshape(-1)[50:], base[kf].reshape(-1)[50:])
    untouched = [k for k in base if k not in (kk, kf)]
    assert all(torch.equal(after[k], base[k]) for k in untouched)
    # the input model is unchanged: loading it again gives the original weights
    again = _weights_after_load(model)
    assert all(torch.equal(again[k], base[k]) for k in base)
    # strength 0 is exactly the original
    m0, _, _ = node.execute(model, edit, 0.0)
    zero = _weights_after_load(m0)
    assert all(torch.equal(zero[k], base[k]) for k in base)


@torch.inference_mode()
def test_wrong_family_is_refused_with_the_family_named(comfy):
    model = random_model()
    bad = _edit_for(None, family="sd1")
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditApplyEdit"]()
    with pytest.raises(FingerprintMismatchError, match="computed for SD1.x; the model is ConceptEdit tiny"):
        node.execute(model, bad, 1.0)
    assert model.patches == {}


@torch.inference_mode()
def test_save_then_load_nodes_round_trip(comfy):
    model = random_model()
    edit = _edit_for(model)
    comfy.NODE_CLASS_MAPPINGS["ConceptEditSaveEdit"]().execute(edit, "roundtrip")
    loader = comfy.NODE_CLASS_MAPPINGS["ConceptEditLoadEdit"]
    names = loader.INPUT_TYPES()["required"]["edit_name"][1]["options"]
    assert "roundtrip.safetensors" in names
    loaded, info = loader().execute("roundtrip.safetensors")
    assert loaded.method == "uce+concept_prune" and '"method": "uce+concept_prune"' in info
    for k, c in edit.changes.items():
        for n, t in c.tensors.items():
            assert torch.equal(loaded.changes[k].tensors[n], t)
    # saving again never overwrites
    comfy.NODE_CLASS_MAPPINGS["ConceptEditSaveEdit"]().execute(edit, "roundtrip")
    assert "roundtrip_001.safetensors" in loader.INPUT_TYPES()["required"]["edit_name"][1]["options"]

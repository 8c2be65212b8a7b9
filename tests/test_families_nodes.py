"""Every node on every 2025-26 family of ComfyUI 0.3.75 (tests/families.py: ComfyUI's own model and
text-encoder classes at tiny widths, random weights), inside the real ComfyUI: the layout is read as
that family's adapter; each method that has its layer computes, goes onto a clone, and the clone
samples a step (EMCID's edited CLIP included); the input stays bit-identical; the LoRA export is read
back by ComfyUI's LoraLoader onto exactly the edited keys; methods that cannot apply say so and what to
use instead (EMCID on HiDream's four encoders and on Lumina 2's Gemma 2, the closed form on HiDream)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("comfy.ldm.qwen_image") is None:
    pytest.skip("this ComfyUI predates Qwen-Image, Wan, HiDream, Flux.2 ... (the 2024-03 copy): "
                "set COMFYUI_PATH to ComfyUI 0.3.75", allow_module_level=True)

import families  # noqa: E402
from test_families_build import _empty_latent, _size  # noqa: E402
from test_layout_matrix import _node, _patched_keys  # noqa: E402

from conceptedit.comfy_host.patches import model_family  # noqa: E402
from conceptedit.editing.errors import ConceptEditError  # noqa: E402

# family -> (adapter kind, variant)
EXPECTED = {"flux2": ("flux", "flux2"), "chroma": ("flux", "chroma"), "qwen_image": ("qwen_image", "qwen-image"),
            "z_image": ("lumina", "z-image"), "lumina2": ("lumina", "lumina2"), "hidream": ("hidream", "hidream"),
            "wan21": ("wan", "wan"), "wan22": ("wan", "wan"), "pixart_sigma": ("pixart", "pixart"),
            "hunyuan_image21": ("hunyuan_image", "hunyuan-image"), "auraflow": ("auraflow", "auraflow")}


def _state(model):
    return {k: v.clone() for k, v in model.model_state_dict().items()}


def _sample(comfy, name, model, clip, info):
    pos = comfy.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = comfy.CLIPTextEncode().encode(clip, "")[0]
    latent = _empty_latent(comfy, info["latent_node"], _size(name))
    out = comfy.common_ksampler(model, 0, 1, 2.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert torch.isfinite(out).all()
    return out


def _readback(comfy, folder_paths, model, clip, edit, name):
    lora = f"families_{name}_{edit.method}"
    _node(comfy, "ConceptEditExportLoRA", edit=edit, filename=lora, model=model, clip=clip)  # masks read W
    path = folder_paths.get_full_path("loras", f"{lora}.safetensors")
    assert path and os.path.isfile(path)
    lm, lc = comfy.LoraLoader().load_lora(model, clip, f"{lora}.safetensors", 1.0, 1.0)
    got = _patched_keys(lm) | _patched_keys(lc.patcher)
    assert got == set(edit.changes), (name, sorted(set(edit.changes) ^ got)[:3])


@pytest.mark.parametrize("name", families.NAMES)
def test_every_node_on_every_family(comfy, one_thread, loras, monkeypatch, tmp_path, name):
    import functools

    import folder_paths
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.nodes import nodes_emcid
    monkeypatch.setattr(nodes_emcid, "emcid_cache_dir", lambda: str(tmp_path / "emcid"))
    monkeypatch.setattr(nodes_emcid, "EmcidConfig", functools.partial(EmcidConfig, n_captions=100))
    why = families.missing(name)
    if why:
        pytest.skip(why)
    model, clip, info = families.build(name)
    px = _size(name)
    with torch.inference_mode():
        before, clip_before = _state(model), {k: v.clone() for k, v in clip.patcher.model_state_dict().items()}
        layout = model_family(model, clip)
        assert (layout.kind, layout.variant) == EXPECTED[name]
        base = _sample(comfy, name, model, clip, info)

        # closed form on the text projection (with the norm in front of it where the model has one)
        if layout.adapter.closed_form_note:
            with pytest.raises(ConceptEditError, match="Unlearn Concept"):
                _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=clip, concepts="red")
            e_uce = None
        else:
            # λ for random text rows of these widths (the default is SD1.5's): the edit must reach its target
            m_uce, e_uce = _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=clip, concepts="red",
                                 lam=1e-3)
            assert set(e_uce.changes) == set(layout.projection_keys("tokens")) == _patched_keys(m_uce)
            assert e_uce.metrics["target_residual_mean"] < 0.5
            assert not torch.equal(_sample(comfy, name, m_uce, clip, info), base)

        # skilled-neuron pruning on the image-stream MLPs
        m_cp, e_cp, _ = _node(comfy, "ConceptEditConceptPrune", model=model, clip=clip, concepts="red",
                              preset="custom", pairs="a {concept} circle | a circle", skill_ratio=0.05, tau=2,
                              steps=2, cfg=2.0, batch_size=2, width=px, height=px)
        assert set(e_cp.changes) == {m.key for m in layout.mlps} == _patched_keys(m_cp)
        _sample(comfy, name, m_cp, clip, info)

        # EMCID runs the CLIP's own layers: on HiDream's four encoders, and on Lumina 2's Gemma 2 (whose MLP
        # outputs are normalised before they join the residual stream), refused with what to use instead
        e_emcid = None
        if name in ("hidream", "lumina2"):
            with pytest.raises(ConceptEditError, match="instead"):
                _node(comfy, "ConceptEditTextEncoderEdit", clip=clip, model=model, concepts="red -> blue",
                      steps=2, use_stage1=False)
        else:
            c_emcid, e_emcid, _ = _node(comfy, "ConceptEditTextEncoderEdit", clip=clip, model=model,
                                        concepts="red -> blue", lam=1.0, use_stage1=False, templates="a photo of {}")
            assert e_emcid.changes and set(e_emcid.changes) == _patched_keys(c_emcid.patcher)
            assert all(".mlp.down_proj." in k or ".DenseReluDense.wo." in k for k in e_emcid.changes)
            _sample(comfy, name, model, c_emcid, info)

    # unlearning: RGD for two steps on the family's own prediction and conditioning
    with torch.inference_mode():
        m_un, e_un, _ = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", method="rgd",
                              steps=2, rank=2, batch=2, n_prompts=2, gen_steps=2, width=px, height=px)
        assert e_un.changes and all(torch.isfinite(c.delta(dtype=torch.float32)).all() for c in e_un.changes.values())
        _sample(comfy, name, m_un, clip, info)

        # shared files: save, load, apply with validation, export as LoRA read back by LoraLoader
        for edit in [e for e in (e_uce, e_cp, e_un, e_emcid) if e is not None]:
            _node(comfy, "ConceptEditSaveEdit", edit=edit, filename=f"families_{name}_{edit.method}")
            loaded, _ = _node(comfy, "ConceptEditLoadEdit", edit_name=f"families_{name}_{edit.method}.safetensors")
            m_ap, c_ap, _ = _node(comfy, "ConceptEditApplyEdit", model=model, edit=loaded, strength=1.0, clip=clip)
            assert _patched_keys(m_ap) | _patched_keys(c_ap.patcher) == set(edit.changes)
            _readback(comfy, folder_paths, model, clip, edit, name)
        import comfy.model_management as mm
        mm.unload_all_models()  # a loaded clone's patches sit in the shared modules until it unloads
        after = model.model_state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before) and not model.patches
        assert all(torch.equal(v, clip.patcher.model_state_dict()[k]) for k, v in clip_before.items())

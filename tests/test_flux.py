"""Flux and SD3 (MMDiT) in the current ComfyUI: the layout read from ComfyUI's own Flux/SD3 classes
(the shipped tiny Flux, and Flux.1 / SD3.5 at real size on the meta device), the closed form on the
text projections through the real nodes, edit files, and LoRA export read back by LoraLoader
(SD3 with its own text stack: tests/test_sd3.py).
A ComfyUI checkout without Flux classes (COMFYUI_PATH set to an old one) skips these tests."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.errors import ConceptEditError

HAS_FLUX = importlib.util.find_spec("comfy.ldm.flux") is not None
needs_flux = pytest.mark.skipif(not HAS_FLUX, reason="this ComfyUI (COMFYUI_PATH) has no Flux/SD3 classes")

FLUX1 = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
         "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
         "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True}


@pytest.fixture(scope="module")
def tiny_flux(comfy):
    if not HAS_FLUX:
        pytest.skip("this ComfyUI has no Flux classes")
    from conceptedit.tiny.flux import load_tiny_flux
    return load_tiny_flux()


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {"diffusion_model." + k: tuple(v.shape) for k, v in module.state_dict().items()}


@needs_flux
def test_comfyui_detects_the_tiny_flux_as_flux_and_the_layout_is_read_from_it(tiny_flux):
    import comfy.model_detection
    import comfy.supported_models
    model, clip, _ = tiny_flux
    sd = {"model.diffusion_model." + k: v for k, v in model.model.diffusion_model.state_dict().items()}
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert isinstance(detected, comfy.supported_models.FluxSchnell), type(detected)
    assert detected.unet_config["hidden_size"] == 64 and detected.unet_config["context_in_dim"] == 64
    assert type(model.model).__name__ == "Flux" and type(clip.cond_stage_model).__name__ == "TinyFluxClip"
    from conceptedit.comfy_host.patches import model_family
    fam = model_family(model, clip)
    assert fam.name == "tiny-flux" and fam.kind == "flux"
    assert [p.key for p in fam.projections] == ["diffusion_model.txt_in.weight",
                                               "diffusion_model.vector_in.in_layer.weight"]
    assert [m.module for m in fam.mlps] == ["double_blocks.0.img_mlp.2", "double_blocks.1.img_mlp.2",
                                           "single_blocks.0.linear2", "single_blocks.1.linear2"]
    assert fam.mlps[-1].offset == 64 and fam.mlps[-1].inner == 256  # linear2: attention columns, then the MLP's
    assert [t.name for t in fam.text_encoders] == ["clip_l", "t5xxl"]  # read from the shipped CLIP's keys


@needs_flux
def test_real_flux1_and_sd35_layouts_on_meta_name_every_edited_key(comfy):
    """Flux.1 (dev) and SD3.5 large/medium built by ComfyUI's own classes on the meta device: the
    families are recognised, every key ConceptEdit edits exists with the shape the family expects,
    and its diffusers name is the one ComfyUI's own flux/mmdit_to_diffusers maps back to it."""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    with torch.device("meta"):
        flux = Flux(**FLUX1, operations=comfy.ops.disable_weight_init)
    shapes = _shapes(flux)
    fam = arch.discover_layout(shapes)
    assert fam.name == "flux1" and len(fam.mlps) == 19 + 38
    exp = {k: v for k, v in fam.expected_shapes().items() if k.startswith("diffusion_model.")}
    assert exp and all(shapes[k] == v for k, v in exp.items())
    # the table's text encoders against ComfyUI's own T5-XXL (its Flux config) and CLIP-L on meta
    import json

    import comfy.clip_model
    from comfy.text_encoders.t5 import T5
    cfg_dir = os.path.dirname(comfy.clip_model.__file__)
    with open(os.path.join(cfg_dir, "text_encoders", "t5_config_xxl.json")) as f:
        t5_cfg = json.load(f)
    with open(os.path.join(cfg_dir, "sd1_clip_config.json")) as f:
        clip_cfg = json.load(f)
    with torch.device("meta"):
        t5 = T5(t5_cfg, torch.float16, "meta", comfy.ops.disable_weight_init)
        clip_l = comfy.clip_model.CLIPTextModel(clip_cfg, torch.float16, "meta", comfy.ops.disable_weight_init)
    text = {f"t5xxl.transformer.{k}": tuple(v.shape) for k, v in t5.state_dict().items()}
    text.update({f"clip_l.transformer.{k}": tuple(v.shape) for k, v in clip_l.state_dict().items()})
    te = {k: v for k, v in fam.expected_shapes().items() if not k.startswith("diffusion_model.")}
    assert {k.split(".")[0] for k in te} == {"clip_l", "t5xxl"} and all(text[k] == v for k, v in te.items())
    assert [t.kohya for t in fam.text_encoders] == ["lora_te1", "lora_te2"]
    assert [t.name for t in arch.discover_text_encoders(text)] == ["clip_l", "t5xxl"]
    ldm_of = comfy.utils.flux_to_diffusers(FLUX1, output_prefix="diffusion_model.")
    for k in exp:
        d = fam.to_diffusers(k)
        assert d.startswith("transformer.") and ldm_of[d[len("transformer."):]] == k, k
    for name, depth in (("sd3.5-large", 38), ("sd3-medium", 24)):
        hidden = 64 * depth
        with torch.device("meta"):
            sd3 = MMDiT(patch_size=2, in_channels=16, out_channels=16, depth=depth, adm_in_channels=2048,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": 4096, "out_features": hidden}},
                        pos_embed_max_size=192, num_patches=36864, operations=comfy.ops.disable_weight_init)
        shapes = _shapes(sd3)
        fam = arch.discover_layout(shapes)
        assert fam.name == name and fam.kind == "sd3" and len(fam.mlps) == depth
        cfg = {"depth": depth, "num_blocks": depth}
        ldm_of = comfy.utils.mmdit_to_diffusers(cfg, output_prefix="diffusion_model.")
        for k, v in fam.expected_shapes().items():
            assert shapes[k] == v, k
            assert ldm_of[fam.to_diffusers(k)[len("transformer."):]] == k, k


@needs_flux
@torch.inference_mode()
def test_closed_form_node_edits_the_text_projections_and_leaves_the_input(comfy, tiny_flux, tmp_path):
    from test_layout_matrix import _node
    model, clip, _ = tiny_flux
    before = {k: v.clone() for k, v in model.model_state_dict().items()}
    out, edit = _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=clip, concepts="red\ntriangle",
                      edit_text_pooled=True)
    assert set(edit.changes) == {"diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"}
    plain = _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=clip, concepts="red")[1]
    assert set(plain.changes) == {"diffusion_model.txt_in.weight"}  # the pooled projection only when asked
    assert edit.family == "tiny-flux" and edit.metrics["preserve_rel_change_mean"] < 0.2
    assert out.patches and not model.patches
    assert all(torch.equal(v, before[k]) for k, v in model.model_state_dict().items())
    # the bias is kept: only weights change
    assert not any(k.endswith(".bias") for k in out.patches)
    # a saved edit loads and applies to the same model, and is refused by an SD model
    path = str(tmp_path / "flux_red.safetensors")
    edit.save(path)
    from conceptedit.editing.edit import Edit
    again = Edit.load(path)
    from conceptedit.comfy_host.view import apply_edit
    m2, _, warnings = apply_edit(model, clip, again)
    assert not warnings and set(m2.patches) == set(out.patches)
    # the same through the file nodes: Save, Load, Apply, Edit Info
    _node(comfy, "ConceptEditSaveEdit", edit=edit, filename="flux_red_nodes")
    loaded, _ = _node(comfy, "ConceptEditLoadEdit", edit_name="flux_red_nodes.safetensors")
    m3, _, _ = _node(comfy, "ConceptEditApplyEdit", model=model, edit=loaded, strength=1.0)
    assert set(m3.patches) == set(out.patches) and not model.patches
    info = _node(comfy, "ConceptEditEditInfo", edit=loaded)[0]
    assert "txt_in" in info and "vector_in" in info, info
    from conceptedit.tiny.comfy_model import load_tiny
    sd_model, sd_clip, _ = load_tiny()
    with pytest.raises(ConceptEditError, match="tiny Flux"):
        apply_edit(sd_model, sd_clip, again)


def _t5_state(clip, prompt: str, layer: int) -> torch.Tensor:
    """The tiny T5's block-`layer` output [L, d] for `prompt`, as ComfyUI's encode runs it."""
    from conceptedit.tiny.comfy_model import encode
    got = {}
    block = clip.cond_stage_model.t5xxl.transformer.encoder.block[layer].layer[1]
    handle = block.register_forward_hook(lambda m, i, o: got.__setitem__("h", o[0].detach().clone()))
    try:
        encode(clip, prompt)
    finally:
        handle.remove()
    return got["h"]


@needs_flux
def test_emcid_on_flux_edits_t5_only_moves_the_concept_and_its_lora_is_read_back(comfy, tiny_flux, loras,
                                                                               monkeypatch):
    """EMCID on the tiny Flux edits T5 (Flux reads tokens from T5 alone) at the table's layer, moves
    the concept's state towards the destination's and leaves other words' states nearly alone;
    the input CLIP is untouched; the LoRA names T5 as ComfyUI's LoraLoader maps it (lora_te2_…)."""
    import conceptedit.nodes.nodes_emcid as ne
    from conceptedit.comfy_host.patches import original_weights
    from conceptedit.editing.export.lora import LoraExportConfig, save_lora
    from test_layout_matrix import _node
    model, clip, _ = tiny_flux
    monkeypatch.setattr(ne, "emcid_cache_dir", lambda: str(loras / "cache"))
    before = {k: v.clone() for k, v in clip.patcher.model_state_dict().items()}
    with torch.inference_mode():
        out_clip, edit, report = _node(comfy, "ConceptEditTextEncoderEdit", model=model, clip=clip,
                                       concepts="red -> purple", use_stage1=False)
    key = "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert set(edit.changes) == {key} and edit.family == "tiny-flux"
    assert edit.params["residual"] == "memit"  # the Flux table's, filled in
    assert not clip.patcher.patches and out_clip.patcher.patches
    assert all(torch.equal(v, before[k]) for k, v in clip.patcher.model_state_dict().items())
    with torch.inference_mode():  # "red" is position 4 of "a photo of red", "purple" of "a photo of purple"
        red0, red1 = _t5_state(clip, "a photo of red", 0)[4], _t5_state(out_clip, "a photo of red", 0)[4]
        purple = _t5_state(clip, "a photo of purple", 0)[4]
        sq0, sq1 = _t5_state(clip, "a blue square", 0), _t5_state(out_clip, "a blue square", 0)
    assert float((red1 - purple).norm()) < 0.5 * float((red0 - purple).norm())
    assert float((sq1 - sq0).norm(dim=-1).max()) < 0.1 * float((red1 - red0).norm())
    # the LoRA file: T5 is the second text encoder of Flux in kohya naming; LoraLoader applies it
    path = loras / "flux_emcid.safetensors"
    save_lora(edit, str(path), LoraExportConfig(dtype="float32"), base=original_weights(clip.patcher))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"lora_te2_encoder_block_0_layer_1_DenseReluDense_wo"}
    # the tiny T5 is stored in float16: LoraLoader's W + ΔW rounds there (about 2e-4 of ΔW's largest entry)
    _assert_loraloader_reads(comfy, model, clip, edit, path, before, text=True, rel_atol=1e-3)


@needs_flux
@torch.inference_mode()
def test_emcid_on_flux_with_a_clip_without_t5_says_which_encoder_is_missing(comfy, tiny_flux):
    """The tiny SD CLIP is as wide as the tiny Flux's text (64), so the model could read it, but
    EMCID edits Flux's T5, which that CLIP does not have: refused before anything runs."""
    from helpers import random_clip
    from test_layout_matrix import _node
    model, _, _ = tiny_flux
    clip = random_clip()
    with pytest.raises(ConceptEditError, match="edits its t5xxl text encoder, which this CLIP does not have.*"
                                               "connect the checkpoint's own CLIP"):
        _node(comfy, "ConceptEditTextEncoderEdit", model=model, clip=clip, concepts="red -> blue", use_stage1=False)
    assert not clip.patcher.patches and not model.patches


@needs_flux
@pytest.mark.usefixtures("loras")  # LoraLoader reads the file from tmp_path
def test_flux_lora_export_is_read_back_by_loraloader(comfy, tiny_flux, tmp_path):
    from safetensors import safe_open

    from conceptedit.comfy_host.patches import original_weights
    from conceptedit.comfy_host.text import ComfyText
    from conceptedit.editing.export.lora import LoraExportConfig, save_lora
    from conceptedit.editing.uce.closed_form import compute_uce
    from conceptedit.editing.uce.config import UCEConfig
    model, clip, _ = tiny_flux
    fam = arch.get_family("tiny-flux")
    base = original_weights(model)
    with torch.inference_mode():
        edit = compute_uce(ComfyText(clip), base, fam, UCEConfig(concepts=["red"], token_window="eos", edit_text_pooled=True))
    path = tmp_path / "flux_edit.safetensors"
    save_lora(edit, str(path), LoraExportConfig(dtype="float32"))
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {"transformer.context_embedder.lora_A.weight", "transformer.context_embedder.lora_B.weight",
                    "transformer.time_text_embed.text_embedder.linear_1.lora_A.weight",
                    "transformer.time_text_embed.text_embedder.linear_1.lora_B.weight"}
    _assert_loraloader_reads(comfy, model, clip, edit, path, base)


def _assert_loraloader_reads(comfy, model, clip, edit, path, base, text: bool = False, rel_atol: float = 1e-4):
    """ComfyUI's own LoraLoader on the file (in the `loras` fixture's folder): exactly the edit's
    weights change, by the edit's ΔW (`text`: the CLIP's weights, else the model's; `base` holds
    the unpatched weights of that side)."""
    import comfy.model_management as mm
    with torch.inference_mode():
        m, c = comfy.LoraLoader().load_lora(model, clip, os.path.basename(path), 0.0 if text else 1.0,
                                            1.0 if text else 0.0)
        patched = c.patcher if text else m
        mm.load_models_gpu([patched])
        got = {k: v.float() - base[k].float() for k, v in patched.model_state_dict().items()}
        mm.unload_all_models()
    changed = {k for k, v in got.items() if v.abs().max() > 0}
    assert changed == set(edit.changes)
    for k, c in edit.changes.items():
        want = c.delta(base[k].float(), dtype=torch.float32) if c.kind == "mask" else c.delta(dtype=torch.float32)
        assert float(want.abs().max()) > 1e-6, k
        torch.testing.assert_close(got[k], want, rtol=0, atol=rel_atol * float(want.abs().max()) + 1e-7,
                                   msg=lambda m, k=k: f"{k}: {m}")


@needs_flux
@pytest.mark.usefixtures("loras")  # LoraLoader reads the file from tmp_path
def test_concept_prune_masks_only_mlp_neurons_and_its_lora_is_read_back(comfy, tiny_flux, tmp_path):
    from conceptedit.comfy_host.patches import original_weights
    from conceptedit.editing.export.lora import LoraExportConfig, save_lora
    from test_layout_matrix import _node
    model, clip, _ = tiny_flux
    with torch.inference_mode():
        out, edit, _info = _node(comfy, "ConceptEditConceptPrune", model=model, clip=clip, concepts="red", steps=3, tau=2)
    fam = arch.get_family("tiny-flux")
    assert set(edit.changes) == {m.key for m in fam.mlps} and not model.patches and out.patches
    for m in fam.mlps:
        idx = edit.changes[m.key].tensors["index"].long()
        assert idx.numel() > 0
        assert bool((idx % m.shape[1] >= m.offset).all()), m.module  # linear2's attention columns stay
    path = tmp_path / "flux_prune.safetensors"
    save_lora(edit, str(path), LoraExportConfig(dtype="float32"), base=original_weights(model))
    _assert_loraloader_reads(comfy, model, clip, edit, path, original_weights(model))


@needs_flux
@pytest.mark.usefixtures("loras")  # LoraLoader reads the file from tmp_path
def test_unlearning_trains_on_the_flow_model_and_exports_kohya_names(comfy, tiny_flux, tmp_path):
    from safetensors import safe_open

    from conceptedit.comfy_host.patches import original_weights
    from conceptedit.editing.export.lora import LoraExportConfig, save_lora
    from test_layout_matrix import _node
    model, clip, _ = tiny_flux
    with torch.inference_mode():
        out, edit, _plot = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", steps=2,
                                 method="esd", params="xattn", n_prompts=2, gen_steps=2)
    assert edit.changes and not model.patches and out.patches
    assert all(".img_attn." in k or ".txt_attn." in k for k in edit.changes), list(edit.changes)
    path = tmp_path / "flux_esd.safetensors"
    save_lora(edit, str(path), LoraExportConfig(dtype="float32", max_rel_error=0.0))
    with safe_open(str(path), "pt") as f:
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in f.keys())
    _assert_loraloader_reads(comfy, model, clip, edit, path, original_weights(model))


@needs_flux
@torch.inference_mode()
def test_distill_audits_and_presence_run_on_the_flux_model(comfy, tiny_flux):
    from test_layout_matrix import _node
    model, clip, vae = tiny_flux
    pruned, mask, _ = _node(comfy, "ConceptEditConceptPrune", model=model, clip=clip, concepts="red", steps=3, tau=2)
    student, edit, _ = _node(comfy, "ConceptEditDistillUnlearn", student=pruned, teacher=model, clip=clip,
                             concept="red", steps=2, gen_steps=2, n_prompts=2)
    assert edit.changes and all(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks."))
                                for k in edit.changes)
    report, _plot = _node(comfy, "ConceptEditResurgenceAudit", edited_model=pruned, original_model=model, clip=clip,
                          concept_prompts="a red circle\na red square", steps="2")
    assert "red" in report or "resurgence" in report.lower()
    out = _node(comfy, "ConceptEditRedTeamAudit", edited_model=pruned, original_model=model, clip=clip, concept="red",
                concept_prompts="a red circle\na red square", steps=2, embedding_match=False,
                samples=2, sample_steps=6, edit=mask)
    report = out[0]
    assert "prefix" in report and "inversion" in report and "revival" in report, report
    text, grid, kept = _node(comfy, "ConceptEditConceptPresence", model=model, edited_model=model, clip=clip, vae=vae,
                             prompts="a red circle", steps=4, timesteps=2, noise_draws=1)
    assert abs(kept - 1.0) < 1e-6  # the same model: everything kept
    assert not model.patches


@needs_flux
def test_the_closed_form_erases_red_from_the_tiny_flux_and_keeps_the_other_colours(comfy, tiny_flux, one_thread):
    """Behaviour on the trained model, read by the tiny world's classifier (4 prompts x 4 samples;
    the defaults: the eos window on T5, txt_in only)."""
    from conceptedit.comfy_host.view import apply_edit
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.editing.audit.evaluate import default_classifier, evaluate
    from conceptedit.editing.uce.config import UCEConfig
    from conceptedit.tiny import world
    from conceptedit.tiny.comfy_model import comfy_sampler
    model, clip, _ = tiny_flux
    classify = default_classifier()
    with torch.inference_mode():
        edit = run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"]))).edit
        edited = apply_edit(model, clip, edit)[0]

    def share(m, concept):
        r = evaluate(comfy_sampler(m, clip, steps=12), world.prompts_for(concept, 4, 0), 4, classify)
        return r.presence.get(concept, 0.0)

    assert share(model, "red") >= 0.75
    assert share(edited, "red") <= 0.4
    for other in ("blue", "green"):
        assert share(edited, other) >= 0.75, other


class _T5Like:
    """T5's token layout (words, EOS 1, padding 0, no BOS), 8 positions, one-hot-ish embeddings."""

    def __init__(self, d=16):
        self.d = d

    def _ids(self, prompt):
        ids = [2 + (sum(map(ord, w)) % 10) for w in prompt.split()] + [1]
        return ids + [0] * (8 - len(ids))

    def token_segments(self, prompt):
        return [(0, self._ids(prompt), 0, 1)]

    def token_ids(self, prompt):
        return self._ids(prompt)

    def encode(self, prompts):
        out = torch.zeros(len(prompts), 8, self.d)
        for b, p in enumerate(prompts):
            for i, t in enumerate(self._ids(p)):
                out[b, i, t] = 1.0
                out[b, i, 12 + min(i, 3)] = 0.5  # position
        return out


def test_t5_windows_start_at_position_0_and_align_on_eos():
    """No BOS: the aligned window of a concept covers every position from 0, its words map to the
    empty guide's EOS (position 0), and no "BOS" row is preserved."""
    from conceptedit.editing.uce.closed_form import build_text_system
    from conceptedit.editing.uce.config import UCEConfig
    text = _T5Like()
    cfg = UCEConfig(concepts=["red apple"], default_preserve=False, preserve=["a tree"], token_window="aligned")
    sys_ = build_text_system(text, cfg)
    assert sys_.concept_rows == [8]  # positions 0..7
    E = text.encode(["red apple", ""])
    torch.testing.assert_close(sys_.C, E[0])
    # words (0, 1) and EOS (2) of the concept -> "" at its EOS (0), then padding -> padding
    want = E[1][torch.tensor([0, 0, 0, 1, 2, 3, 4, 5])]
    torch.testing.assert_close(sys_.G, want)
    cfg_eos = UCEConfig(concepts=["red apple"], default_preserve=False, token_window="eos")
    assert build_text_system(text, cfg_eos).concept_rows == [3]  # the two words and EOS
    # the default reads a T5 run (no BOS) as eos
    assert build_text_system(text, UCEConfig(concepts=["red apple"], default_preserve=False)).concept_rows == [3]
    cfg_last = UCEConfig(concepts=["red apple"], default_preserve=False, token_window="last")
    s_last = build_text_system(text, cfg_last)
    torch.testing.assert_close(s_last.C, E[0][1:2])


@needs_flux
def test_debias_node_runs_on_the_tiny_flux_with_the_model_as_judge(comfy, tiny_flux):
    """The debias loop's plumbing on Flux: pictures through the flow sampler, the model's own
    presence score as the judge, the closed form on txt_in; the input is left unchanged."""
    import math

    import comfy.model_management as mm
    model, clip, _ = tiny_flux
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditUCEDebias"]()
    mm.unload_all_models()  # an earlier test's patched clone, loaded, would show its weights in the shared model
    before = {k: v.clone() for k, v in model.model_state_dict().items()}
    with torch.inference_mode():
        res = node.execute(model, clip, "a circle", "red:0.5, blue:0.5", 0.05, 1, 2, 2, 5.0, 0,
                           default_preserve=False, width=64, height=64)
    out_model, edit, text = res.result
    assert out_model is not model and not model.patches and out_model.patches
    assert all(torch.equal(v, before[k]) for k, v in model.model_state_dict().items())
    assert set(edit.changes) == {"diffusion_model.txt_in.weight"} and edit.family == "tiny-flux"
    d = edit.metrics["debias"]
    assert d["rounds"] and all(math.isclose(sum(r["shares"]["a circle"]), 1.0) for r in d["rounds"])
    assert "round 0" in text


def _guidance_distilled_flux(tiny_flux):
    """The tiny Flux as a Flux-dev: ComfyUI's Flux class with the guidance embedding, the tiny weights
    and a random `guidance_in` (ComfyUI adds guidance 3.5 to its conditioning, as FluxGuidance)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from conceptedit.tiny.flux import FLUX_CONFIG, classes
    model, _, _ = tiny_flux
    config = classes()["TinyFlux"]({**FLUX_CONFIG, "guidance_embed": True})
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sd = model.model.diffusion_model.state_dict()
        for k, v in base.diffusion_model.state_dict().items():
            v.copy_(sd[k] if k in sd else torch.randn(v.shape, generator=g) * 0.1)
    assert base.diffusion_model.params.guidance_embed
    return comfy.model_patcher.ModelPatcher(base.eval(), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@needs_flux
@torch.inference_mode()
def test_a_guidance_distilled_flux_is_sampled_at_cfg_1_and_the_tiny_flux_at_the_cfg_asked(comfy, tiny_flux):
    """Flux-dev guides through its guidance embedding: the pack's own pictures of it (calibration,
    training pictures, audits) are ComfyUI's at CFG 1 whatever cfg a method asks, and its DDIM path
    never reads the unconditional branch; a model without the embedding gets the cfg asked."""
    import comfy.sample
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    from conceptedit.editing.diffusion import ddim_sample
    _, clip, _ = tiny_flux
    dev = ComfyDenoiser(_guidance_distilled_flux(tiny_flux), clip)
    schnell = ComfyDenoiser(tiny_flux[0], clip)
    assert dev.guidance_distilled and not schnell.guidance_distilled

    def comfy_at(host, cfg):
        latent = torch.zeros(1, 4, *host.latent_size)
        noise = comfy.sample.prepare_noise(latent, 3)
        pos, neg = host.text.conditioning(["a red circle"]), host.text.conditioning([""])
        return comfy.sample.sample(host.model, noise, 3, cfg, "euler", "normal", pos, neg, latent, seed=3,
                                   disable_pbar=True)

    got = dev.sample(["a red circle"], steps=3, cfg=5.0, seed=3)
    assert torch.equal(got, comfy_at(dev, 1.0))
    assert (got - comfy_at(dev, 5.0)).abs().max() > 1e-3  # CFG 5 would have drawn another picture
    assert torch.equal(schnell.sample(["a red circle"], steps=3, cfg=5.0, seed=3), comfy_at(schnell, 5.0))

    cond, pooled = dev.text.encode_with_pooled(["a red circle"])
    y = dev.adm(pooled, 1)
    nan = torch.full_like(cond, float("nan"))
    x = ddim_sample(dev, cond, nan, steps=3, cfg=5.0, seed=0, y=y, y_uncond=torch.full_like(y, float("nan")))
    assert torch.isfinite(x).all() and torch.equal(x, ddim_sample(dev, cond, cond, steps=3, cfg=1.0, seed=0, y=y,
                                                                   y_uncond=y))
    assert not torch.isfinite(ddim_sample(schnell, cond, nan, steps=3, cfg=5.0, seed=0, y=y, y_uncond=y)).all()

"""Scoped edits (editing/scope.py): an edit changes only the keys its method edits. A file or an
in-memory edit that touches other layers, carries non-float changes or non-integer mask indices,
holds a change kind its method never writes, or names an unknown method is refused with an
EditFileError before anything is applied; every method's real edit passes, on any UNet layout."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from conceptedit.comfy_host.denoiser import ComfyDenoiser
from conceptedit.comfy_host.patches import model_fingerprint, original_weights
from conceptedit.comfy_host.text import ComfyText
from conceptedit.comfy_host.view import apply_edit
from conceptedit.editing import arch, scope
from conceptedit.editing.edit import FORMAT, Change, Edit, combine
from conceptedit.editing.errors import EditFileError
from conceptedit.editing.training import PARAM_SETS, select_targets
from conceptedit.editing.report.view import edit_text, edit_view
from helpers import random_clip, random_model
from test_unlearn import Host, Text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAM = arch.get_family("tiny")
PAIRS = "a {concept} in a park | a park\na red {concept} | a red thing\n"


@pytest.fixture(scope="module")
def model_clip(comfy):
    return random_model(seed=3), random_clip()


def _uce(model, clip, window="last"):
    from conceptedit.editing.uce.closed_form import compute_uce
    from conceptedit.editing.uce.config import UCEConfig
    e = compute_uce(ComfyText(clip), original_weights(model), FAM,
                    UCEConfig(concepts=["circle"], default_preserve=False, preserve=["a star"], token_window=window))
    e.fingerprint = model_fingerprint(model)
    return e


@pytest.fixture(scope="module")
def real_edits(comfy, model_clip):
    """Every method's own output on the random tiny model (small settings), by name."""
    from conceptedit.comfy_host.jobs import edit_between
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    from conceptedit.editing.concept_prune.prune import compute_concept_prune, floor_edit
    from conceptedit.editing.concept_prune.config import PruneConfig
    from conceptedit.editing.distill.bilevel import compute_distill_unlearn
    from conceptedit.editing.distill.config import DistillConfig
    from conceptedit.editing.emcid import EmcidConfig, compute_emcid
    from conceptedit.editing.prompts import build_pairs
    from conceptedit.editing.audit.resurgence import AuditConfig, audit
    from conceptedit.editing.unlearn.trainer import compute_unlearn
    from conceptedit.editing.unlearn.config import UnlearnConfig

    model, clip = model_clip
    out = {"uce": _uce(model, clip, "last"), "uce-dense": _uce(model, clip, "aligned")}
    with torch.inference_mode():
        out["concept_prune"] = compute_concept_prune(
            ComfyDenoiser(model, clip, latent_hw=8), FAM, build_pairs(["circle"], "custom", PAIRS),
            PruneConfig(skill_ratio=0.05, steps=2, tau=1))
    out["concept_prune-floor"] = floor_edit(out["concept_prune"])
    out["emcid"] = compute_emcid(ComfyTextModel(clip), FAM, [("circle", "square")],
                                 EmcidConfig(use_stage1=False, lam=300.0, n_captions=20, templates=("a photo of {}",)))
    host, text = Host(model), Text()
    small = dict(steps=1, batch=2, n_prompts=2, gen_steps=2, gen_cfg=3.0, rank=2, lr=1e-3, seed=0)
    for method, ps in (("rgd", "lora"), ("ga", "lora-xattn"), ("esd", "xattn"), ("esd", "noxattn")):
        cfg = UnlearnConfig(method=method, param_set=ps, **{**small, "lr": 1e-6 if ps == "noxattn" else 1e-3})
        out[f"unlearn-{method}-{ps}"] = compute_unlearn(host, text, "circle", cfg, family="tiny")
    out["distill-unlearn"] = compute_distill_unlearn(
        host, text, out["concept_prune"], "circle",
        DistillConfig(steps=2, erase_every=2, param_set="xattn", batch=2, n_prompts=2, gen_steps=2, lr_distill=1e-3),
        family="tiny")
    fine_tunes = []

    def presence(edits):
        fine_tunes.extend(e for e, _ in edits if e.method == "benign-finetune")
        return 1.0 if not edits else 0.5

    audit(host, text, out["uce"], presence, AuditConfig(checkpoints=(1,), batch=2, gen_steps=2),
          benign_prompts=["a house"])
    out["benign-finetune"] = fine_tunes[-1]
    out["uce+concept_prune"] = combine([(out["uce"], 1.0), (out["concept_prune"], 1.0)])
    out["unlearn+emcid"] = combine([(out["unlearn-rgd-lora"], 0.5), (out["emcid"], 1.0)])
    with torch.inference_mode():
        edited = apply_edit(model, None, out["uce"])[0]
        out["model-difference"] = edit_between(edited, model)
        import comfy.model_management as mm
        mm.unload_all_models()
    for name, e in out.items():
        assert e.changes, name
    return out


def _write(path, method, entries: dict, tensors: dict, params=None):
    meta = {"format": FORMAT, "version": 1, "method": method, "family": "tiny", "params": params or {},
            "entries": entries}
    save_file(tensors, str(path), metadata={"conceptedit": json.dumps(meta)})
    return path


def _spy_patches(monkeypatch):
    """Every add_patches call any ModelPatcher receives (to prove nothing was applied)."""
    import comfy.model_patcher
    calls = []
    real = comfy.model_patcher.ModelPatcher.add_patches

    def spy(self, *a, **k):
        calls.append(a)
        return real(self, *a, **k)
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "add_patches", spy)
    return calls


# ---- refusals -----------------------------------------------------------------------------------
def test_uce_file_that_also_rewrites_the_out_layer_is_refused_with_nothing_applied(comfy, model_clip, tmp_path,
                                                                                    monkeypatch):
    import folder_paths
    model, clip = model_clip
    edit = _uce(model, clip)
    out_key = "diffusion_model.out.2.weight"
    shape = tuple(original_weights(model)[out_key].shape)
    tensors, meta = edit.to_tensors()
    m = json.loads(meta["conceptedit"])
    m["entries"][out_key] = {"kind": "delta", "shape": list(shape)}
    tensors[f"{out_key}::delta"] = torch.randn(shape)
    folder = folder_paths.get_folder_paths("concept_edits")[0]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "uce_plus_out.safetensors")
    save_file(tensors, path, metadata={**meta, "conceptedit": json.dumps(m)})
    with pytest.raises(EditFileError, match=r"changes diffusion_model\.out\.2\.weight .*outside what uce edits"):
        Edit.load(path)
    with pytest.raises(EditFileError, match="outside what uce edits"):
        comfy.NODE_CLASS_MAPPINGS["ConceptEditLoadEdit"]().execute("uce_plus_out.safetensors")
    # the same edit built in memory: apply_edit (and the Apply node) refuse it before any patch
    bad = Edit("uce", "tiny", {**edit.changes, out_key: Change("delta", shape, {"delta": torch.randn(shape)})},
               params=edit.params, fingerprint=edit.fingerprint)
    calls = _spy_patches(monkeypatch)
    with pytest.raises(EditFileError, match="outside what uce edits"):
        apply_edit(model, clip, bad)
    with pytest.raises(EditFileError, match="outside what uce edits"):
        comfy.NODE_CLASS_MAPPINGS["ConceptEditApplyEdit"]().execute(model, bad, 1.0)
    assert calls == [] and model.patches == {} and clip.patcher.patches == {}
    with pytest.raises(EditFileError, match="outside"):
        bad.save(tmp_path / "never.safetensors")
    assert not os.path.exists(tmp_path / "never.safetensors")
    # without the extra key the very same edit applies
    assert apply_edit(model, clip, edit)[0].patches


def test_int8_changes_are_refused(comfy, model_clip, tmp_path, monkeypatch):
    model, _ = model_clip
    key = FAM.attn2_kv_keys()[0]
    shape = FAM.expected_shapes()[key]
    p = _write(tmp_path / "int8.safetensors", "uce", {key: {"kind": "delta", "shape": list(shape)}},
               {f"{key}::delta": torch.ones(shape, dtype=torch.int8)})
    with pytest.raises(EditFileError, match=rf"{re.escape(key)}: .*'delta' tensor is torch.int8.*float32"):
        Edit.load(p)
    p = _write(tmp_path / "int8_lowrank.safetensors", "uce", {key: {"kind": "lowrank", "shape": list(shape)}},
               {f"{key}::up": torch.ones(shape[0], 1, dtype=torch.int8), f"{key}::down": torch.ones(1, shape[1])})
    with pytest.raises(EditFileError, match="'up' tensor is torch.int8"):
        Edit.load(p)
    with pytest.raises(EditFileError, match="int8"):
        Change("delta", shape, {"delta": torch.ones(shape, dtype=torch.int8)})
    # a tensor swapped after construction is caught by apply_edit, before any patch
    e = Edit("uce", "tiny", {key: Change("delta", shape, {"delta": torch.ones(shape)})})
    e.changes[key].tensors["delta"] = torch.ones(shape, dtype=torch.int8)
    calls = _spy_patches(monkeypatch)
    with pytest.raises(EditFileError, match="int8"):
        apply_edit(model, None, e)
    assert calls == [] and model.patches == {}


def test_float_mask_indices_are_refused(comfy, model_clip, tmp_path):
    model, _ = model_clip
    key = FAM.ffn_out_keys()[0]
    shape = FAM.expected_shapes()[key]
    p = _write(tmp_path / "float_mask.safetensors", "concept_prune", {key: {"kind": "mask", "shape": list(shape)}},
               {f"{key}::index": torch.tensor([0.0, 5.0, 7.0])})
    with pytest.raises(EditFileError, match=r"mask index is torch.float32.*int32/int64"):
        Edit.load(p)
    with pytest.raises(EditFileError, match="int32/int64"):
        Change("mask", shape, {"index": torch.tensor([0.0, 1.0])})
    e = Edit("concept_prune", "tiny", {key: Change("mask", shape, {"index": torch.tensor([0, 1])})})
    e.changes[key].tensors["index"] = torch.tensor([0.0, 1.0])
    with pytest.raises(EditFileError, match="int32/int64"):
        apply_edit(model, None, e)
    assert model.patches == {}


def test_change_kinds_and_keys_that_do_not_fit_the_method_are_refused(comfy, model_clip, tmp_path):
    model, clip = model_clip
    kk, kf = FAM.attn2_kv_keys()[0], FAM.ffn_out_keys()[0]
    te = FAM.text_encoders[0].fc2_key(0)
    shapes = FAM.expected_shapes()
    # a UCE file carrying a mask
    p = _write(tmp_path / "uce_mask.safetensors", "uce", {kk: {"kind": "mask", "shape": list(shapes[kk])}},
               {f"{kk}::index": torch.tensor([0, 1])})
    with pytest.raises(EditFileError, match="holds a mask change of .*uce writes only delta/lowrank"):
        Edit.load(p)
    # ConceptPrune writes masks only; and only on ff.net.2
    cases = [
        ("concept_prune", {kf: Change("delta", shapes[kf], {"delta": torch.zeros(shapes[kf])})}, "writes only mask"),
        ("concept_prune", {kk: Change("mask", shapes[kk], {"index": torch.tensor([1])})}, "outside what concept_prune"),
        ("emcid", {kk: Change("delta", shapes[kk], {"delta": torch.zeros(shapes[kk])})}, "outside what emcid"),
        ("uce", {te: Change("delta", shapes[te], {"delta": torch.zeros(shapes[te])})}, "outside what uce"),
        ("unlearn-esd", {kk.replace("attn2", "attn1"): Change("delta", shapes[kk][:1] * 2, {"delta": torch.zeros(
            shapes[kk][:1] * 2)})}, "outside what unlearn-esd"),
        ("uce+concept_prune", {kk: Change("mask", shapes[kk], {"index": torch.tensor([1])})}, "holds a mask change"),
    ]
    for method, changes, msg in cases:
        params = {"param_set": "xattn"} if method.startswith("unlearn") else {}
        e = Edit(method, "tiny", changes, params=params)
        with pytest.raises(EditFileError, match=msg):
            apply_edit(model, clip, e)
        tensors, meta = e.to_tensors()
        save_file(tensors, str(tmp_path / "x.safetensors"), metadata=meta)
        with pytest.raises(EditFileError, match=msg):
            Edit.load(tmp_path / "x.safetensors")
    assert model.patches == {} and clip.patcher.patches == {}


def test_unknown_methods_and_unrecorded_parameter_sets_are_refused(comfy, model_clip, tmp_path):
    model, _ = model_clip
    kk = FAM.attn2_kv_keys()[0]
    shape = FAM.expected_shapes()[kk]
    ch = {kk: Change("delta", shape, {"delta": torch.zeros(shape)})}
    p = _write(tmp_path / "magic.safetensors", "magic", {kk: {"kind": "delta", "shape": list(shape)}},
               {f"{kk}::delta": torch.zeros(shape)})
    with pytest.raises(EditFileError, match="unknown edit method 'magic'"):
        Edit.load(p)
    for method, params, msg in [("magic", {}, "unknown edit method 'magic'"),
                                ("uce+magic", {}, "unknown edit method 'magic'"),
                                ("unlearn-esd", {}, "does not record which parameter set"),
                                ("unlearn-esd", {"param_set": "everything"}, "unknown parameter set 'everything'")]:
        with pytest.raises(EditFileError, match=msg):
            apply_edit(model, None, Edit(method, "tiny", ch, params=params))
    assert model.patches == {}


# ---- every method's own edits pass, on any layout ---------------------------------------------------
def test_every_method_real_edit_passes_loads_and_applies(comfy, model_clip, real_edits, tmp_path):
    import comfy.model_management as mm
    model, clip = model_clip
    for name, e in real_edits.items():
        e.check_scope()
        path = e.save(tmp_path / f"{name}.safetensors")
        back = Edit.load(path)
        assert back.method == e.method and set(back.changes) == set(e.changes), name
        m2, c2, _ = apply_edit(model, clip, back)
        patched = set(m2.patches) | (set(c2.patcher.patches) if c2 is not clip else set())
        assert patched == set(e.changes), name
    mm.unload_all_models()
    assert model.patches == {}


def test_every_method_name_the_code_writes_has_a_scope():
    from conceptedit.editing.concept_prune.config import METHOD
    from conceptedit.editing.unlearn.config import METHODS
    known = set(scope.known_methods())
    assert {METHOD, "uce", "emcid", "distill", "distill-unlearn", "benign-finetune", "model-difference"} <= known
    assert {f"unlearn-{m}" for m in METHODS} <= known
    assert set(scope.PARAM_SET_RULES) == set(PARAM_SETS)
    name = r'"([a-z][a-z0-9_-]*)"'
    literal = re.compile(rf"(?:to_edit\(|Edit\((?:method=)?)\s*{name}|name = {name} if .* else {name}")
    found = set()
    for folder in ("editing", "comfy_host", "nodes", "cli", "bench"):
        for d, _, names in os.walk(os.path.join(ROOT, folder)):  # the method packages too
            for f in names:
                if f.endswith(".py"):
                    for m in literal.finditer(open(os.path.join(d, f)).read()):
                        found |= {g for g in m.groups() if g}
    assert "benign-finetune" in found, "the scan missed editing/audit/resurgence.py"
    assert found and found <= known, found - known


def _meta_unet(cfg):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)


# a layout no table names: conv proj_in/out, uneven depths, its own widths and text width
CUSTOM = dict(arch.TINY_UNET, model_channels=32, channel_mult=[1, 3], num_res_blocks=[1, 2],
              transformer_depth=[2, 0, 1], transformer_depth_middle=1, transformer_depth_output=[1, 0, 2, 1, 0],
              context_dim=40, use_linear_in_transformer=False, num_heads=4, num_head_channels=-1)


@pytest.mark.parametrize("layout", ["tiny", "sd1", "sdxl", "custom"])
def test_scopes_follow_module_names_on_any_layout(comfy, layout):
    cfg = CUSTOM if layout == "custom" else arch.get_family(layout).unet_config
    unet = _meta_unet(cfg)
    modules = dict(unet.named_modules())
    shapes = {f"diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}
    # what each parameter set trains is exactly what its scope admits
    for ps in PARAM_SETS:
        trained = {f"diffusion_model.{n}.weight" for n in select_targets(modules, ps)}
        admitted = {k for k, s in shapes.items() if scope.PARAM_SET_RULES[ps].matches(k, s)}
        assert admitted == trained, (ps, sorted(admitted ^ trained)[:4])
    kv = {k for k in shapes if re.search(r"\.attn2\.to_[kv]\.weight$", k)}
    ffn = {k for k in shapes if k.endswith(".ff.net.2.weight")}
    assert kv and ffn
    assert {k for k, s in shapes.items() if scope.KV.matches(k, s)} == kv
    assert {k for k, s in shapes.items() if scope.FFN_OUT.matches(k, s)} == ffn
    # a UCE-like edit of every K/V and a prune-like edit of every FFN of this layout pass
    scope.check_scope("uce", {}, {k: Change("delta", shapes[k], {"delta": torch.zeros(shapes[k])}) for k in kv})
    scope.check_scope("concept_prune", {}, {k: Change("mask", shapes[k], {"index": torch.tensor([0])}) for k in ffn})
    with pytest.raises(EditFileError, match="outside"):
        k = "diffusion_model.out.2.weight"
        scope.check_scope("uce", {}, {k: Change("delta", shapes[k], {"delta": torch.zeros(shapes[k])})})


# ---- Concept Edit Info shows exactly the layers an edit touches ------------------------------------------
def test_edit_info_lists_exactly_the_changed_layers(comfy, real_edits):
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditEditInfo"]()
    for name, e in real_edits.items():
        out = node.execute(e)
        view = out.ui["conceptedit_edit"][0]
        hm = view["heatmap"]
        cells = [(r, c) for r, row in zip(hm["rows"], hm["values"]) for c, v in zip(hm["cols"], row) if v is not None]
        assert view["n_keys"] == len(e.changes) == len(cells), name
        listed = [ln for ln in out[0].splitlines()[3:] if ln.startswith("  ")]
        assert sum(ln.count("=") for ln in listed) == len(e.changes), name
        assert edit_text(edit_view(e)) == out[0]


def test_emcid_scope_takes_t5_feed_forward_outputs_and_nothing_else_of_t5():
    from conceptedit.editing.scope import check_scope
    wo = "t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wo.weight"
    low = Change("lowrank", (64, 128), {"up": torch.zeros(64, 1), "down": torch.zeros(1, 128)})
    check_scope("emcid", {}, {wo: low})
    for key in ("t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.o.weight",
                "t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wi_0.weight"):
        with pytest.raises(EditFileError, match="outside what emcid"):
            check_scope("emcid", {}, {key: low})

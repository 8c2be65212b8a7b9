"""LoRA export: files that ComfyUI's own LoraLoader reads reproduce the edit's deltas."""

import pytest
import torch
from safetensors import safe_open

from conceptedit.comfy_host.patches import original_weights
from conceptedit.comfy_host.text import ComfyText
from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.export.lora import LoraExportConfig, edit_to_lora, save_lora
from conceptedit.editing.uce.closed_form import compute_uce
from conceptedit.editing.uce.config import UCEConfig
from helpers import random_model
from test_uce import random_clip

FAM = arch.get_family("tiny")
TE_KEY = FAM.text_encoders[0].fc2_key(0)


@pytest.fixture(scope="module")
def model_clip(comfy):
    return random_model(), random_clip()


def _edit(model, clip, window):
    """A UCE edit of the UNet (lowrank for 'last', dense for 'aligned') plus a text-encoder fc2 change."""
    e = compute_uce(ComfyText(clip), original_weights(model), FAM,
                    UCEConfig(concepts=["circle", "square"], default_preserve=False, preserve=["a star"],
                              token_window=window))
    g = torch.Generator().manual_seed(5)
    shape = FAM.expected_shapes()[TE_KEY]
    e.changes[TE_KEY] = Change("lowrank", shape, {"up": torch.randn(shape[0], 3, generator=g) * 0.05,
                                                  "down": torch.randn(3, shape[1], generator=g) * 0.05})
    return e


def _loaded_deltas(comfy, model, clip, name):
    """Run the REAL LoraLoader, load the patched models and return (unet deltas, te deltas)."""
    import comfy.model_management as mm
    base_u = {k: v.clone() for k, v in model.model_state_dict().items()}
    base_t = {k: v.clone() for k, v in clip.patcher.model_state_dict().items()}
    with torch.inference_mode():
        m, c = comfy.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
        mm.load_models_gpu([m, c.patcher])
        du = {k: v.float() - base_u[k].float() for k, v in m.model_state_dict().items()}
        dt = {k: v.float() - base_t[k].float() for k, v in c.patcher.model_state_dict().items()}
        mm.unload_all_models()
    for k, v in model.model_state_dict().items():  # unpatched again, the input was never changed
        assert torch.equal(v, base_u[k]), k
    return du, dt


def _assert_fp16_close(got, want, key):
    scale = float(want.abs().max())
    assert scale > 1e-4, f"{key}: the edit is empty, the test would prove nothing"
    torch.testing.assert_close(got, want, rtol=0, atol=4e-3 * scale, msg=key)


@pytest.mark.parametrize("window", ["last", "aligned"])
def test_comfyui_loraloader_reproduces_the_edit(comfy, loras, model_clip, window):
    model, clip = model_clip
    edit = _edit(model, clip, window)
    kinds = {c.kind for k, c in edit.changes.items() if k != TE_KEY}
    assert kinds == ({"lowrank"} if window == "last" else {"delta"})
    rep = save_lora(edit, loras / f"uce_{window}.safetensors", LoraExportConfig(max_rel_error=1e-3))
    assert rep["max_rel_error"] <= 1e-3 and rep["diff_modules"] == 0
    with safe_open(rep["path"], framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_network_module"] == "networks.lora"
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight" in keys
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith("attn2_to_k.alpha") for k in keys)
    du, dt = _loaded_deltas(comfy, model, clip, f"uce_{window}.safetensors")
    want = edit.deltas()
    for k, d in want.items():
        _assert_fp16_close((dt if k == TE_KEY else du)[k], d.float(), k)
    # nothing else moved
    assert all(float(v.abs().max()) == 0 for k, v in du.items() if k not in want)
    assert all(float(v.abs().max()) == 0 for k, v in dt.items() if k not in want)


def test_export_node_writes_a_file_loraloader_lists_and_diff_form(comfy, loras, model_clip):
    model, clip = model_clip
    edit = _edit(model, clip, "aligned")
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditExportLoRA"]
    out = node().execute(edit, "my_edit", 0, 0.01, "diff")
    assert "my_edit.safetensors" in out[0]
    import folder_paths
    assert "my_edit.safetensors" in folder_paths.get_filename_list("loras")
    node().execute(edit, "my_edit", 0, 0.01, "diff")  # never overwrites
    assert "my_edit_001.safetensors" in folder_paths.get_filename_list("loras")
    du, dt = _loaded_deltas(comfy, model, clip, "my_edit.safetensors")
    for k, d in edit.deltas().items():
        _assert_fp16_close((dt if k == TE_KEY else du)[k], d.float(), k)


def test_export_node_names_and_dtype(comfy, loras, model_clip):
    """The node's optional unet_names / dtype reach the file: diffusers-style UNet names and float32."""
    model, clip = model_clip
    edit = _edit(model, clip, "last")
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditExportLoRA"]
    node().execute(edit, "named_ldm", 0, 0.01, "svd")
    node().execute(edit, "named_diffusers", 0, 0.01, "svd", unet_names="diffusers", dtype="float32")
    with safe_open(str(loras / "named_ldm.safetensors"), framework="pt") as f:
        ldm = {k: f.get_tensor(k).dtype for k in f.keys()}
    with safe_open(str(loras / "named_diffusers.safetensors"), framework="pt") as f:
        dif = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert any(k.startswith("lora_unet_input_blocks_") for k in ldm)
    assert any(k.startswith("lora_unet_down_blocks_") for k in dif)
    assert not any(k.startswith("lora_unet_input_blocks_") for k in dif)
    assert {d for k, d in ldm.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {d for k, d in dif.items() if not k.endswith(".alpha")} == {torch.float32}
    with pytest.raises(Exception, match="unet_names"):
        node().execute(edit, "bad", 0, 0.01, "svd", unet_names="peft")


def test_svd_rank_and_error_are_reported_truthfully():
    g = torch.Generator().manual_seed(0)
    k = FAM.attn2_kv_keys()[0]
    shape = FAM.expected_shapes()[k]
    dense = torch.randn(shape, generator=g)
    edit = Edit("test", "tiny", {k: Change("delta", shape, {"delta": dense})})
    sd, rep = edit_to_lora(edit, LoraExportConfig(max_rel_error=0.5, dtype="float32"))
    name = FAM.to_kohya(k)
    approx = sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"]
    true_err = float((approx - dense).norm() / dense.norm())
    r = rep["per_key"][k]["rank"]
    assert 1 <= r < min(shape) and true_err <= 0.5
    assert rep["per_key"][k]["rel_error"] == pytest.approx(true_err, rel=1e-4)
    # a lowrank change past the rank cap is truncated through its factors, error reported
    low = Edit("test", "tiny", {k: Change("lowrank", shape, {"up": torch.randn(shape[0], 6, generator=g),
                                                             "down": torch.randn(6, shape[1], generator=g)})})
    sd2, rep2 = edit_to_lora(low, LoraExportConfig(rank=2, dtype="float32"))
    full = low.changes[k].delta()
    got = sd2[f"{name}.lora_up.weight"] @ sd2[f"{name}.lora_down.weight"]
    assert sd2[f"{name}.lora_up.weight"].shape[1] == 2 and float(sd2[f"{name}.alpha"]) == 2.0
    assert rep2["per_key"][k]["rel_error"] == pytest.approx(float((got - full).norm() / full.norm()), rel=1e-4)


def test_real_families_use_diffusers_names_comfyui_maps(comfy):
    import comfy.utils
    from conceptedit.editing.export.lora import kohya_name
    for fam_name in ("sd1", "sdxl"):
        fam = arch.get_family(fam_name)
        ldm_of = comfy.utils.unet_to_diffusers(dict(fam.unet_config))
        comfy_names = {"lora_unet_" + d[:-len(".weight")].replace(".", "_"): "diffusion_model." + l
                       for d, l in ldm_of.items() if d.endswith(".weight")}
        for k in fam.attn2_kv_keys():
            assert comfy_names[kohya_name(fam, k)] == k
        te = fam.text_encoders[-1]
        assert kohya_name(fam, te.fc2_key(3)) == f"{te.kohya}_text_model_encoder_layers_3_mlp_fc2"


def test_masks_need_base_weights_and_become_diff():
    k = FAM.ffn_out_keys()[0]
    shape = FAM.expected_shapes()[k]
    edit = Edit("prune", "tiny", {k: Change("mask", shape, {"index": torch.tensor([0, 3, 9])})})
    with pytest.raises(InvalidInputError, match="base weights"):
        edit_to_lora(edit)
    w = torch.randn(shape)
    sd, rep = edit_to_lora(edit, base={k: w}, config=LoraExportConfig(dtype="float32"))
    d = sd[FAM.to_kohya(k) + ".diff"].reshape(-1)
    assert rep["diff_modules"] == 1 and torch.equal(d[[0, 3, 9]], -w.reshape(-1)[[0, 3, 9]])
    assert int((d != 0).sum()) == 3
    with pytest.raises(InvalidInputError, match="no weights"):
        edit_to_lora(Edit("x", "tiny", {}))


def test_dit_files_split_fused_layers_into_diffusers_modules_or_keep_comfyui_names():
    from conceptedit.editing.arch.dit import split_rows
    g = torch.Generator().manual_seed(3)
    qkv, lin1 = "diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.single_blocks.0.linear1.weight"
    shapes = {qkv: (96, 32), lin1: (96 + 128, 32)}
    changes = {k: Change("lowrank", s, {"up": torch.randn(s[0], 2, generator=g), "down": torch.randn(2, s[1], generator=g)})
               for k, s in shapes.items()}
    sd, rep = edit_to_lora(Edit("unlearn-rgd", "chroma", changes, params={"param_set": "lora"}),
                           LoraExportConfig(dtype="float32"))
    # Chroma: diffusers' names, the fused rows split (q, k, v as wide as the input, the MLP the rest)
    parts = {qkv: [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"],
             lin1: [f"transformer.single_transformer_blocks.0.attn.to_{p}" for p in "qkv"]
             + ["transformer.single_transformer_blocks.0.proj_mlp"]}
    assert set(sd) == {f"{n}.lora_{ab}.weight" for names in parts.values() for n in names for ab in "AB"}
    for key, names in parts.items():
        assert rep["per_key"][key]["modules"] == names
        up = torch.cat([sd[f"{n}.lora_B.weight"] for n in names])
        assert all(torch.equal(sd[f"{n}.lora_A.weight"], sd[f"{names[0]}.lora_A.weight"]) for n in names)
        torch.testing.assert_close(up @ sd[f"{names[0]}.lora_A.weight"], changes[key].delta())
    assert [r[2] for r in split_rows(("a", "b", "c", "d*"), 224, 32)] == [32, 32, 32, 128]
    with pytest.raises(ValueError, match="does not split"):
        split_rows(("a", "b", "c"), 100, 32)
    # a layer with no known diffusers name: ComfyUI's names for the whole file (ComfyUI reads them for
    # every model), and a refusal when diffusers' names are asked for
    odd = "diffusion_model.distilled_guidance_layer.in_proj.weight"
    more = dict(changes, **{odd: Change("delta", (16, 16), {"delta": torch.randn(16, 16, generator=g)})})
    sd2, _ = edit_to_lora(Edit("test", "chroma", more), LoraExportConfig(dtype="float32"))
    assert {k.rsplit(".lora_", 1)[0] for k in sd2} == {k[:-len(".weight")] for k in more}
    with pytest.raises(InvalidInputError, match="no diffusers name"):
        edit_to_lora(Edit("test", "chroma", more), LoraExportConfig(unet_names="diffusers"))

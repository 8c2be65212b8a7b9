"""editing/export/diffusers.py against real diffusers modules: every table key of SD1.5, SD2 and SDXL
names an existing parameter of the right shape in diffusers' UNet2DConditionModel / transformers'
CLIP text models (built on the meta device), and apply/undo on a small real UNet is exact."""
import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.export.diffusers import apply_to_diffusers, map_keys
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import FingerprintMismatchError, InvalidInputError

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (requirements-dev.txt)")
transformers = pytest.importorskip("transformers")

SD1 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2 = dict(SD1, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
TEXT = {"clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        # diffusers' SD2 text encoder keeps 23 of OpenCLIP-H's 24 layers (it reads the penultimate one)
        "clip_h": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)}


def _meta_pipeline(family: str) -> dict:
    unet_cfg = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}[family]
    with torch.device("meta"):
        mods = {"unet": diffusers.UNet2DConditionModel(**unet_cfg)}
        for te in arch.get_family(family).text_encoders:
            cfg = transformers.CLIPTextConfig(**TEXT["clip_h" if family == "sd2" else te.name])
            cls = transformers.CLIPTextModelWithProjection if te.diffusers == "text_encoder_2" else transformers.CLIPTextModel
            mods[te.diffusers] = cls(cfg)
    return mods


def _full_edit(fam: arch.Family, keys) -> Edit:
    shapes = fam.expected_shapes()
    return Edit("test", fam.name, {k: _lazy_change(shapes[k]) for k in keys})


def _lazy_change(shape):
    # a mask with no indices: valid for any shape, costs no memory even at SDXL size
    return Change("mask", shape, {"index": torch.zeros(0, dtype=torch.int64)})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_table_key_maps_to_a_real_diffusers_parameter(family):
    fam = arch.get_family(family)
    mods = _meta_pipeline(family)
    keys = list(fam.expected_shapes())
    if family == "sd2":  # the 24th CLIP-H layer is not in diffusers: a clear error, checked below
        last = fam.text_encoders[0].fc2_key(23)
        keys.remove(last)
    mapping = map_keys(_full_edit(fam, keys), mods)
    assert set(mapping) == set(keys)
    n_blocks = sum(1 for k in keys if k.endswith("attn2.to_k.weight"))
    assert n_blocks == {"sd1": 16, "sd2": 16, "sdxl": 70}[family]
    # every cross-attention K/V and FFN weight of the diffusers UNet is covered, and no two keys share one
    unet_names = {n for n, _ in mods["unet"].named_parameters()
                  if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight", "ff.net.0.proj.weight", "ff.net.2.weight"))}
    mapped = [name for comp, name, _ in mapping.values() if comp == "unet"]
    assert len(mapped) == len(set(mapped)) and set(mapped) == unet_names
    if family == "sd2":
        with pytest.raises(FingerprintMismatchError, match="does not have"):
            map_keys(_full_edit(fam, [last]), mods)


def test_wrong_family_or_component_is_refused_before_anything_changes():
    sd1 = _meta_pipeline("sd1")
    xl = arch.get_family("sdxl")
    with pytest.raises(FingerprintMismatchError, match="shape"):
        map_keys(_full_edit(xl, [xl.attn2_kv_keys()[0]]), sd1)  # SDXL's first block is 640 wide, SD1's 320
    with pytest.raises(InvalidInputError, match="text_encoder_2"):
        map_keys(_full_edit(xl, [xl.text_encoders[1].fc2_key(0)]), {"unet": sd1["unet"]})
    with pytest.raises(InvalidInputError, match="neither"):
        apply_to_diffusers(object(), _full_edit(xl, [xl.attn2_kv_keys()[0]]))


# ---- apply and undo on a small real diffusers UNet with the SD1 block structure ---------------------
SMALL_COMFY = dict(arch.SD1_UNET, model_channels=32, context_dim=32, num_heads=2)
SMALL_DIFFUSERS = dict(SD1, block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, attention_head_dim=2,
                       norm_num_groups=8, sample_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _small():
    fam = arch.Family("small", "small SD1 layout", 32, arch._blocks_from_unet(SMALL_COMFY), (), SMALL_COMFY)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SMALL_DIFFUSERS).eval()
    return fam, unet


def _same(unet, before) -> bool:
    now = unet.state_dict()
    return all(torch.equal(now[k], before[k]) for k in before)


def test_apply_then_undo_on_a_real_unet_is_exact():
    fam, unet = _small()
    shapes = fam.expected_shapes()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    kk, kf = fam.attn2_kv_keys()[5], fam.ffn_out_keys()[-1]
    n = shapes[kf][0] * shapes[kf][1]
    edit = Edit("test", "small", {
        kk: Change("lowrank", shapes[kk], {"up": torch.randn(shapes[kk][0], 2, generator=g),
                                           "down": torch.randn(2, shapes[kk][1], generator=g)}),
        kf: Change("mask", shapes[kf], {"index": torch.arange(0, n, 3)}),
    })
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        y0 = unet(x, 10, encoder_hidden_states=ctx).sample
        handle = apply_to_diffusers({"unet": unet}, edit, strength=0.5, family=fam)
        after = unet.state_dict()
        nk = fam.to_diffusers(kk)[len("unet."):]
        nf = fam.to_diffusers(kf)[len("unet."):]
        torch.testing.assert_close(after[nk], before[nk] + 0.5 * edit.changes[kk].delta(), rtol=0, atol=1e-6)
        flat_b, flat_a = before[nf].reshape(-1), after[nf].reshape(-1)
        torch.testing.assert_close(flat_a[0::3], 0.5 * flat_b[0::3])
        assert torch.equal(flat_a[1::3], flat_b[1::3])
        assert all(torch.equal(after[k], before[k]) for k in before if k not in (nk, nf))
        assert not torch.allclose(unet(x, 10, encoder_hidden_states=ctx).sample, y0)
        assert sorted(handle.keys) == sorted([kk, kf])
        handle.undo()
        assert _same(unet, before)
        assert torch.equal(unet(x, 10, encoder_hidden_states=ctx).sample, y0)
        handle.undo()  # a second undo is a no-op
        # strength 0 is the identity; the context manager undoes on exit
        with apply_to_diffusers({"unet": unet}, edit, strength=0.0, family=fam):
            assert _same(unet, before)
        with apply_to_diffusers({"unet": unet}, edit, family=fam):
            assert not torch.equal(unet.state_dict()[nk], before[nk])
        assert _same(unet, before)


# ---- Automatic1111: scripts/conceptedit_a1111.py on a fake sd_model with the real SD1.5 names ------------
def _a1111_script():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "conceptedit_a1111.py")
    spec = importlib.util.spec_from_file_location("conceptedit_a1111_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # no A1111 here: the guarded imports leave it inert
    return mod


def _fake_sd_model(comfy_unet, te_params: dict) -> torch.nn.Module:
    """A module tree shaped like A1111's LatentDiffusion: .model.diffusion_model (the real LDM UNet)
    and cond_stage_model.transformer.text_model... (only the given text-encoder weights)."""
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.diffusion_model = comfy_unet
    for name, tensor in te_params.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(tensor))
    return root


def test_a1111_script_applies_and_restores_on_the_sd15_tree(comfy):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    script = _a1111_script()
    assert script.IN_A1111 is False and not hasattr(script, "ConceptEditScript")
    fam = arch.get_family("sd1")
    shapes = fam.expected_shapes()
    unet = UNetModel(**fam.unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    kk, kf, kt = fam.attn2_kv_keys()[3], fam.ffn_out_keys()[7], fam.te_fc2_keys()[4]
    g = torch.Generator().manual_seed(0)
    # the weights the edit touches are real (fp16, as A1111 keeps them); the rest of the SD1.5 UNet stays on meta
    for key in (kk, kf):
        *path, leaf = key[len("diffusion_model."):].split(".")
        mod = unet.get_submodule(".".join(path))
        setattr(mod, leaf, torch.nn.Parameter(torch.randn(shapes[key], generator=g).half(), requires_grad=False))
    te_name = "cond_stage_model.transformer.text_model.encoder.layers.4.mlp.fc2.weight"
    sd_model = _fake_sd_model(unet, {te_name: torch.randn(shapes[kt], generator=g).half()})
    assert script.a1111_name(fam, kt) == te_name
    assert script.a1111_name(fam, kk) == "model." + kk
    before = {k: sd_model.get_parameter(script.a1111_name(fam, k)).detach().clone() for k in (kk, kf, kt)}
    n = shapes[kf][0] * shapes[kf][1]
    edit = Edit("test", "sd1", {
        kk: Change("lowrank", shapes[kk], {"up": torch.randn(shapes[kk][0], 1, generator=g),
                                           "down": torch.randn(1, shapes[kk][1], generator=g)}),
        kf: Change("mask", shapes[kf], {"index": torch.arange(0, n, 2)}),
        kt: Change("delta", shapes[kt], {"delta": torch.full(shapes[kt], 0.25)}),
    })
    handle = script.apply_edit_to_sd_model(sd_model, edit, 1.0)
    now = {k: sd_model.get_parameter(script.a1111_name(fam, k)).detach() for k in (kk, kf, kt)}
    assert all(v.dtype == torch.float16 for v in now.values())
    torch.testing.assert_close(now[kk].float(), (before[kk].float() + edit.changes[kk].delta()).half().float())
    assert torch.all(now[kf].reshape(-1)[0::2] == 0) and torch.equal(now[kf].reshape(-1)[1::2], before[kf].reshape(-1)[1::2])
    torch.testing.assert_close(now[kt].float(), (before[kt].float() + 0.25).half().float())
    handle.undo()
    assert all(torch.equal(sd_model.get_parameter(script.a1111_name(fam, k)), before[k]) for k in before)
    # an SDXL edit on this SD1.5 model is refused before anything changes
    xl = arch.get_family("sdxl")
    bad = Edit("test", "sdxl", {xl.attn2_kv_keys()[0]: Change("mask", xl.expected_shapes()[xl.attn2_kv_keys()[0]],
                                                                 {"index": torch.zeros(0, dtype=torch.int64)})})
    with pytest.raises(ValueError, match="made for SDXL; the loaded model is SD1.x"):
        script.apply_edit_to_sd_model(sd_model, bad)
    assert all(torch.equal(sd_model.get_parameter(script.a1111_name(fam, k)), before[k]) for k in before)


def test_a1111_names_of_openclip_encoders():
    script = _a1111_script()
    xl, sd2 = arch.get_family("sdxl"), arch.get_family("sd2")
    assert script.a1111_name(xl, xl.text_encoders[1].fc2_key(5)) == \
        "conditioner.embedders.1.model.transformer.resblocks.5.mlp.c_proj.weight"
    assert script.a1111_name(xl, xl.text_encoders[0].fc2_key(2)) == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.weight"
    assert script.a1111_name(sd2, sd2.text_encoders[0].fc2_key(0)) == \
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight"
    assert script.a1111_name(xl, xl.attn2_kv_keys()[-1]) == "model." + xl.attn2_kv_keys()[-1]
    with pytest.raises(KeyError, match="only the text encoder's MLP"):
        script.a1111_name(xl, "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")

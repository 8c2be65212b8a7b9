"""The architecture tables against the real layouts, built with ComfyUI's own classes on `meta`."""
import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.errors import UnknownArchitectureError


def _unet_state_shapes(cfg):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    m = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
    return {"diffusion_model." + k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name,n_blocks,ctx,comfy_cls", [
    ("sd1", 16, 768, "SD15"), ("sd2", 16, 1024, "SD20"), ("sdxl", 70, 2048, "SDXL"), ("tiny", None, None, None)])
def test_unet_tables_match_real_layouts(comfy, name, n_blocks, ctx, comfy_cls):
    fam = arch.get_family(name)
    if n_blocks is not None:
        assert len(fam.blocks) == n_blocks and fam.context_dim == ctx
    shapes = _unet_state_shapes(fam.unet_config)
    # every key the table names exists with the expected shape
    for k, s in fam.expected_shapes().items():
        if k.startswith("diffusion_model."):
            assert shapes.get(k) == s, k
    # and the table names every cross-attention block of the real model
    real_k = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    assert real_k == sorted(k for k in fam.attn2_kv_keys() if "to_k" in k)
    assert arch.detect_family(shapes) is fam
    # the config is the one ComfyUI itself recognises as that model
    if comfy_cls:
        import comfy.model_detection
        found = comfy.model_detection.model_config_from_unet_config(dict(fam.unet_config))
        assert type(found).__name__ == comfy_cls


def test_sdxl_geglu_is_5120_wide():
    fam = arch.get_family("sdxl")
    widths = {fam.expected_shapes()[k][0] for k in fam.geglu_keys()}
    assert widths == {2 * 4 * 640, 2 * 4 * 1280}
    assert max(fam.expected_shapes()[k][1] for k in fam.ffn_out_keys()) == 5120


@pytest.mark.parametrize("name,json_name,prefix", [("sd1", "sd1_clip_config.json", "clip_l"),
                                                   ("sd2", "sd2_clip_config.json", "clip_h"),
                                                   ("sdxl", "clip_config_bigg.json", "clip_g")])
def test_text_encoder_tables_match_comfy_clip(comfy, name, json_name, prefix):
    import json, os
    import comfy.clip_model, comfy.ops, comfy.sd1_clip
    root = os.path.dirname(comfy.sd1_clip.__file__)
    found = [os.path.join(d, json_name) for d, _, files in os.walk(root) if json_name in files]
    cfg = json.load(open(found[0]))  # moved to comfy/text_encoders/ in later ComfyUI
    with torch.no_grad():  # as ComfyUI builds it (it copies an identity into text_projection)
        m = comfy.clip_model.CLIPTextModel(cfg, None, "meta", comfy.ops.manual_cast)
    shapes = {f"{prefix}.transformer.{k}": tuple(v.shape) for k, v in m.state_dict().items()}
    fam = arch.get_family(name)
    te = [t for t in fam.text_encoders if t.name == prefix][0]
    for i in range(te.layers):
        assert shapes[te.fc2_key(i)] == (te.width, te.mlp)
    assert f"{prefix}.transformer.text_model.encoder.layers.{te.layers}.mlp.fc2.weight" not in shapes
    assert max(te.edit_layers) < te.layers


def test_diffusers_and_kohya_names():
    sd1 = arch.get_family("sd1")
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert sd1.to_diffusers(k) == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert sd1.to_kohya(k) == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    assert sd1.to_kohya_diffusers_style(k) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd1.to_diffusers("diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight") == \
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight"
    assert sd1.to_diffusers("diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight") == \
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    xl = arch.get_family("sdxl")
    assert xl.to_diffusers("diffusion_model.output_blocks.5.1.transformer_blocks.1.attn2.to_v.weight") == \
        "unet.up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v.weight"
    assert xl.to_kohya("clip_g.transformer.text_model.encoder.layers.3.mlp.fc2.weight") == \
        "lora_te2_text_model_encoder_layers_3_mlp_fc2"
    assert sd1.to_kohya(sd1.text_encoders[0].fc2_key(0)) == "lora_te_text_model_encoder_layers_0_mlp_fc2"


def test_diffusers_names_exist_in_real_diffusers_layout(comfy):
    # ComfyUI's own diffusers<->LDM key map is an independent statement of the same naming.
    import comfy.utils
    for name in ("sd1", "sdxl"):
        fam = arch.get_family(name)
        ldm_of = comfy.utils.unet_to_diffusers(dict(fam.unet_config))  # diffusers name -> LDM name
        diff_of = {v: k for k, v in ldm_of.items()}
        for k in fam.attn2_kv_keys() + fam.ffn_out_keys():
            ldm = k[len("diffusion_model."):]
            assert "unet." + diff_of[ldm] == fam.to_diffusers(k), k


def test_a_model_without_cross_attention_is_a_clear_error():
    flux = {"diffusion_model.double_blocks.0.img_mlp.0.weight": (12288, 3072),
            "diffusion_model.double_blocks.0.img_mlp.2.weight": (3072, 12288),
            "diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072),
            "diffusion_model.single_blocks.0.linear2.weight": (3072, 15360),
            "diffusion_model.txt_in.weight": (3072, 4096)}
    fam = arch.discover_layout(flux)  # a DiT: its text enters through txt_in
    assert fam.kind == "flux" and fam.projection_keys() == ["diffusion_model.txt_in.weight"]
    del flux["diffusion_model.txt_in.weight"]  # no layer the text enters through that ConceptEdit knows
    with pytest.raises(UnknownArchitectureError, match="none of the DiTs.*double_blocks, single_blocks"):
        arch.discover_layout(flux)
    with pytest.raises(UnknownArchitectureError, match="attn2"):
        arch.discover_layout({"diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320)})


def test_detect_accepts_checkpoint_prefixes(comfy):
    fam = arch.get_family("sd1")
    shapes = {("model." + k): v for k, v in fam.expected_shapes().items() if k.startswith("diffusion_model.")}
    assert arch.detect_family(shapes) is fam


def test_fingerprint_separates_layout_and_weights():
    fam = arch.get_family("tiny")
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in fam.expected_shapes().items()}
    a = arch.fingerprint(fam, state)
    b = arch.fingerprint(fam, {k: v.half() for k, v in state.items()})
    assert a == b  # dtype the model was loaded in does not matter
    state2 = dict(state)
    k0 = fam.attn2_kv_keys()[0]
    state2[k0] = state[k0] * 2
    c = arch.fingerprint(fam, state2)
    assert c["layout"] == a["layout"] and c["weights"] != a["weights"]
    assert arch.fingerprint(arch.get_family("sd1"), {})["layout"] != a["layout"]


def test_discovery_reads_widths_and_encoders_from_shapes():
    base = "diffusion_model.input_blocks.4.1.transformer_blocks.0"
    shapes = {f"{base}.attn2.to_k.weight": (96, 48), f"{base}.attn2.to_v.weight": (96, 48),
              f"{base}.attn2.to_out.0.weight": (160, 96), f"{base}.ff.net.0.proj.weight": (1280, 160),
              f"{base}.ff.net.2.weight": (160, 640),
              "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (160, 48),
              "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight": (160, 48),
              "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (160, 48),
              "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (160, 48)}
    fam = arch.discover_layout(shapes, text_shapes={
        "clip_g.transformer.text_model.encoder.layers.0.mlp.fc2.weight": (48, 192),
        "clip_g.transformer.text_model.encoder.layers.5.mlp.fc2.weight": (48, 192)})
    assert fam.name == "custom" and fam.context_dim == 48
    assert [b.ldm.split(".transformer")[0] for b in fam.blocks] == ["input_blocks.1.1", "input_blocks.4.1",
                                                                     "middle_block.1"]  # execution order
    b = fam.blocks[1]
    assert (b.dim, b.kv_rows, b.ffn, b.geglu) == (160, 96, 640, True)
    assert fam.expected_shapes()[f"{base}.ff.net.0.proj.weight"] == (1280, 160)
    assert fam.ffn_out_keys() == [f"{base}.ff.net.2.weight"]  # blocks without an FFN key get none
    (g,) = fam.text_encoders
    assert (g.name, g.layers, g.width, g.kohya, g.diffusers) == ("clip_g", 6, 48, "lora_te", "text_encoder")
    assert fam.to_kohya(g.fc2_key(5)) == "lora_te_text_model_encoder_layers_5_mlp_fc2"
    with pytest.raises(KeyError, match="diffusers names"):
        fam.to_diffusers(f"{base}.attn2.to_k.weight")
    # with ComfyUI's UNet config the diffusers names come back for the same keys
    sdxl = {k: v for k, v in arch.get_family("sdxl").expected_shapes().items() if k.startswith("diffusion_model.")}
    drop = [k for k in sdxl if k.startswith("diffusion_model.middle_block.")]
    cfg = dict(arch.SDXL_UNET, transformer_depth_middle=-1)
    student = arch.discover_layout({k: v for k, v in sdxl.items() if k not in drop}, unet_config=cfg)
    assert student.name == "custom" and len(student.blocks) == 60
    assert student.to_diffusers(student.attn2_kv_keys()[0]).startswith("unet.down_blocks.1.attentions.0.")


def test_sdxl_encoders_name_te1_te2_and_layout_hash_tracks_the_unet():
    fam = arch.discover_layout({k: v for k, v in arch.get_family("sdxl").expected_shapes().items()},
                               text_shapes=arch.get_family("sdxl").expected_shapes())
    assert fam is arch.get_family("sdxl")
    enc = arch.discover_text_encoders(arch.get_family("sdxl").expected_shapes())
    assert [(t.name, t.kohya, t.diffusers, t.edit_layers) for t in enc] == [
        ("clip_l", "lora_te1", "text_encoder", (8, 9, 10)), ("clip_g", "lora_te2", "text_encoder_2", (26, 27, 28, 29, 30))]
    a = arch.fingerprint(arch.get_family("sd1"), {})
    assert a["layout_version"] == "2" and a["encoders"] == "clip_l"

"""Every DiT family ComfyUI 0.3.75 ships for text-to-image and text-to-video, at its real size on
the meta device (ComfyUI's own config classes, with the configs `comfy.model_detection` reads off a
checkpoint): each is read as its own adapter and variant only, with the text projection (and the norm
in front of it), MLPs and attention sets the methods use; ComfyUI's own detection agrees. Building
on `meta` costs no memory, so the real widths are checked, not small copies."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.arch.dit import detect_kind, module_paths
from conceptedit.editing.errors import UnknownArchitectureError
from conceptedit.editing.training import select_targets

pytestmark = pytest.mark.skipif(importlib.util.find_spec("comfy.ldm.qwen_image") is None,
                                reason="this ComfyUI copy (2024-03) has none of the 2025-26 families")

_FLUX = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
             qkv_bias=True, patch_size=2, in_channels=16, hidden_size=3072, context_in_dim=4096, vec_in_dim=768,
             depth=19, depth_single_blocks=38, guidance_embed=True)
# name: (config class, unet_config, adapter kind, variant, tokens projection, its norm, hidden)
CASES = {
    "flux1": ("Flux", _FLUX, "flux", "flux1", "txt_in", "", 3072),
    "flux2": ("Flux2", dict(_FLUX, image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=48, mlp_ratio=3.0,
                            theta=2000, out_channels=128, global_modulation=True, vec_in_dim=None, mlp_silu_act=True,
                            qkv_bias=False, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                            patch_size=1, in_channels=128, hidden_size=6144, context_in_dim=15360, depth=8,
                            depth_single_blocks=48), "flux", "flux2", "txt_in", "", 6144),
    "chroma": ("Chroma", dict({k: v for k, v in _FLUX.items() if k not in ("vec_in_dim", "guidance_embed")},
                              image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=3072,
                              hidden_dim=5120, n_layers=5), "flux", "chroma", "txt_in", "", 3072),
    "qwen-image": ("QwenImage", {"image_model": "qwen_image"}, "qwen_image", "qwen-image", "txt_in", "txt_norm", 3072),
    "z-image": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560,
                               n_layers=30, qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                               axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                               z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
                "lumina", "z-image", "cap_embedder.1", "cap_embedder.0", 3840),
    "lumina2": ("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304,
                                n_layers=26, qk_norm=True, n_heads=24, n_kv_heads=8, axes_dims=[32, 32, 32],
                                axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0),
                "lumina", "lumina2", "cap_embedder.1", "cap_embedder.0", 2304),
    "hidream": ("HiDream", dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32],
                                caption_channels=[4096, 4096], max_resolution=[128, 128], in_channels=16,
                                llama_layers=list(range(32)) + [31] * 16, num_attention_heads=20,
                                num_routed_experts=4, num_activated_experts=2, num_layers=16, num_single_layers=32,
                                out_channels=16, patch_size=2, text_emb_dim=2048), "hidream", "hidream", None, "", 0),
    "wan2.1": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v"), "wan", "wan", "text_embedding.0", "", 2048),
    "wan2.2": ("WAN22_T2V", dict(image_model="wan2.1", model_type="t2v", out_dim=48, in_dim=48, dim=3072,
                                 ffn_dim=14336, num_heads=24, num_layers=30), "wan", "wan", "text_embedding.0", "", 3072),
    "hunyuan-image": ("HunyuanImage21", dict(image_model="hunyuan_video", in_channels=64, patch_size=[1, 1],
                                             out_channels=64, vec_in_dim=None, axes_dim=[64, 64], meanflow=False,
                                             context_in_dim=3584, hidden_size=3584, mlp_ratio=4.0, num_heads=28,
                                             depth=20, depth_single_blocks=40, theta=256, qkv_bias=True, byt5=True,
                                             guidance_embed=False, use_cond_type_embedding=False, vision_in_dim=None),
                      "hunyuan_image", "hunyuan-image", "txt_in.input_embedder", "", 3584),
    "auraflow": ("AuraFlow", {"cond_seq_dim": 2048}, "auraflow", "auraflow", "cond_seq_linear", "", 3072),
    "sd3": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=24, adm_in_channels=2048,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": 4096, "out_features": 1536}},
                        pos_embed_max_size=192, num_patches=36864, pos_embed_scaling_factor=None),
            "sd3", "sd3", "context_embedder", "", 1536),
}


def _meta(name):
    import comfy.supported_models as sm
    cls, cfg = getattr(sm, CASES[name][0]), CASES[name][1]
    with torch.device("meta"):
        base = cls(dict(cfg)).get_model({}, device="meta")
    return base


_SHAPES: dict = {}


def _shapes(name):
    if name not in _SHAPES:
        base = _meta(name)
        _SHAPES[name] = ({f"diffusion_model.{k}": tuple(v.shape) for k, v in base.diffusion_model.state_dict().items()},
                         dict(base.model_config.unet_config), dict(base.diffusion_model.named_modules()))
    return _SHAPES[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_family_is_read_as_its_own_adapter_with_its_text_projection_and_mlps(comfy, name):
    _, _, kind, variant, tokens, norm, hidden = CASES[name]
    shapes, config, modules = _shapes(name)
    adapter, kinds = detect_kind(list(shapes))
    assert kinds == [kind], f"{name}'s keys match {kinds}"   # exactly one kind, never another's
    fam = arch.discover_layout(shapes, unet_config=config)
    assert (fam.kind, fam.variant) == (kind, variant) and fam.is_mmdit
    projs = {p.module: p for p in fam.projections if p.source == "tokens"}
    if tokens is None:
        assert not projs and adapter.closed_form_note  # HiDream: no token projection, a refusal that says why
    else:
        assert list(projs) == [tokens] and projs[tokens].norm == norm and projs[tokens].rows == hidden
        for p in projs.values():  # the projection and its norm are real modules of the model
            assert isinstance(modules[p.module], torch.nn.Linear)
            assert not p.norm or p.norm in modules
    assert fam.mlps and all(m.inner > 0 and m.key in shapes for m in fam.mlps)
    assert all(shapes[m.key] == m.shape for m in fam.mlps)
    # unlearning's parameter sets on the real module tree: ESD-x where image and text meet, ESD-u the rest
    xattn, noxattn, lora = (set(select_targets(modules, ps)) for ps in ("xattn", "noxattn", "lora"))
    assert xattn and noxattn and not xattn & noxattn and xattn | noxattn == lora
    assert not any(p.module in lora for p in fam.projections)  # the text path is not trained
    # a layout no table names keeps its variant's name, and the edit's keys name the same layout back
    if fam.name not in arch.FAMILIES:
        edit_keys = {k: shapes[k] for k in fam.projection_keys() + [m.key for m in fam.mlps[:2]]}
        again = arch.layout_of_edit(fam.name, edit_keys)
        assert (again.kind, again.variant) == (kind, variant)
        assert [p.module for p in again.projections] == [p.module for p in fam.projections]


@pytest.mark.parametrize("name", sorted(CASES))
def test_comfyui_detects_the_same_family_from_the_keys(comfy, name):
    """ComfyUI's own detection (what its loader runs on a checkpoint) finds the config class the case
    was built from: the key layouts above are the ones users' files have."""
    import comfy.model_detection
    shapes, config, _ = _shapes(name)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    found = comfy.model_detection.detect_unet_config(sd, "diffusion_model.")
    assert found is not None and found.get("image_model") == config.get("image_model"), (name, found)


def test_a_checkpoint_with_two_kinds_of_keys_is_refused_naming_both(comfy):
    shapes = dict(_shapes("wan2.1")[0])
    shapes.update(_shapes("qwen-image")[0])
    with pytest.raises(UnknownArchitectureError, match="more than one model kind.*qwen_image.*wan|wan.*qwen_image"):
        arch.discover_layout(shapes)


def test_comfyui_config_naming_another_kind_is_refused(comfy):
    shapes, _, _ = _shapes("wan2.1")
    with pytest.raises(UnknownArchitectureError, match="config says qwen_image"):
        arch.discover_layout(shapes, unet_config={"image_model": "qwen_image"})


def test_every_adapter_signature_is_met_by_its_own_family_only(comfy):
    for name in CASES:
        mods = module_paths(_shapes(name)[0])
        met = [a.kind for a in arch.ADAPTERS.values() if a.matches(mods)]
        assert met == [CASES[name][2]], (name, met)

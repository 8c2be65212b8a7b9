"""LoRA files of editing/export/lora.py for the 2025-26 families, read by diffusers and by ComfyUI.

Per family: ComfyUI's own model at tiny widths (tests/families.py) computes real edits (the closed
form through its node, and an unlearning LoRA trained for two steps on every Linear of the blocks),
the edit is exported, and
- diffusers reads the file into the family's real transformer class (built from a config of the
  same widths), through the LoRA loader of the family's pipeline (`load_lora_weights` + `fuse_lora`
  on the real pipeline class; HunyuanImage's pipeline has none: its transformer's
  `load_lora_adapter`; diffusers has none for PixArt: PEFT itself);
- ComfyUI's LoraLoader code (`comfy.lora.model_lora_keys_unet` + `load_lora`) reads the default file;
- ConceptPrune's masks, which no diffusers loader takes as a LoRA (`.diff`), go onto the transformer
  through `apply_to_diffusers`, exactly and undoably. (HiDream refuses the closed form.)
The transformer holds the ComfyUI model's weights converted by an independent statement of the names:
diffusers' own single-file converter (`diffusers.loaders.single_file_utils`) where it has one that
works at these widths, ComfyUI's own diffusers map (`comfy.utils.*_to_diffusers`) for Chroma and
PixArt, a table written out here for Lumina 2 and HunyuanImage. So the expected diffusers weights
after the LoRA are convert(W + ΔW): exactly the parameters that differ between convert(W) and
convert(W + ΔW) must move, each by that difference.

Which file each family gets (`editing.arch.dit.Variant.lora_names`), both hosts reading it unless
said: Qwen-Image, Chroma, PixArt, AuraFlow, HiDream ``transformer.<diffusers name>``; Z-Image
``diffusion_model.<diffusers name>``; Flux.2 and Wan ``diffusion_model.<ComfyUI name>``. Wan's
closed-form file (text_embedding alone) and Lumina 2's and HunyuanImage's files are read by diffusers
only in diffusers' names (``unet_names="diffusers"``), which ComfyUI does not map for those models."""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

if importlib.util.find_spec("comfy.ldm.qwen_image") is None:
    pytest.skip("this ComfyUI predates Qwen-Image, Wan, Flux.2 ... (the 2024-03 copy): set COMFYUI_PATH to "
                "ComfyUI 0.3.75", allow_module_level=True)
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (requirements-dev.txt)")
pytest.importorskip("peft", reason="peft is not installed: diffusers' LoRA loaders need it (requirements-dev.txt)")

import families  # noqa: E402
from test_families_build import _size  # noqa: E402
from test_layout_matrix import _node  # noqa: E402

from conceptedit.editing.export.lora import LoraExportConfig, edit_to_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- ComfyUI state dict (no prefix) -> diffusers transformer state dict: (state dict, unet_config) -> dict
def _single_file(name: str) -> Callable[[dict, dict], dict]:
    """diffusers' own converter of an original checkpoint (ComfyUI's names are the originals)."""
    from diffusers.loaders import single_file_utils
    fn = getattr(single_file_utils, name)
    return lambda sd, unet_config: fn(dict(sd))


def _comfy_map(name: str) -> Callable[[dict, dict], dict]:
    """ComfyUI's own diffusers map (`comfy.utils.<name>`: diffusers key -> ComfyUI key, or a row
    slice of one)."""
    def convert(sd, unet_config):
        import comfy.utils
        out = {}
        for dkey, src in getattr(comfy.utils, name)(dict(unet_config)).items():
            if isinstance(src, str):
                if src in sd:
                    out[dkey] = sd[src]
            elif src[0] in sd and src[1] is not None:
                dim, start, size = src[1]
                out[dkey] = sd[src[0]].narrow(dim, start, size)
        return out
    return convert


def _rename(rules) -> Callable[[dict, dict], dict]:
    """A table of (ComfyUI pattern, diffusers template) written out here. A template of several names
    ("a|b|c") splits the rows: a part as many rows as the weight has inputs, or, marked "~", an equal
    share of the rows the others leave (grouped-query K and V, the single blocks' MLP)."""
    def convert(sd, unet_config):
        out = {}
        for key, t in sd.items():
            for pat, template in rules:
                m = re.fullmatch(pat, key)
                if m is None:
                    continue
                names = template.format(*m.groups()).split("|")
                if len(names) == 1:
                    out[names[0]] = t
                    break
                shared = [n for n in names if n.startswith("~")]
                rest = (t.shape[0] - t.shape[1] * (len(names) - len(shared))) // max(len(shared), 1)
                sizes = [rest if n.startswith("~") else t.shape[1] for n in names]
                for n, piece in zip(names, torch.split(t, sizes), strict=True):
                    out[n.lstrip("~")] = piece
                break
        return out
    return convert


_LUMINA2 = _rename([(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.attention\.qkv\.weight",
                     "{0}.attn.to_q.weight|~{0}.attn.to_k.weight|~{0}.attn.to_v.weight"),
                    (r"((?:layers|noise_refiner|context_refiner)\.\d+)\.attention\.out\.weight",
                     "{0}.attn.to_out.0.weight"),
                    (r"(.+)\.feed_forward\.w([123])\.weight", "{0}.feed_forward.linear_{1}.weight"),
                    (r"(.+)\.adaLN_modulation\.1\.weight", "{0}.norm1.linear.weight"),
                    (r"cap_embedder\.1\.weight", "time_caption_embed.caption_embedder.1.weight")])
_HUNYUAN_IMAGE = _rename([
    (r"double_blocks\.(\d+)\.img_attn\.qkv\.weight",
     "|".join(f"transformer_blocks.{{0}}.attn.{p}.weight" for p in ("to_q", "to_k", "to_v"))),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv\.weight",
     "|".join(f"transformer_blocks.{{0}}.attn.{p}.weight" for p in ("add_q_proj", "add_k_proj", "add_v_proj"))),
    (r"double_blocks\.(\d+)\.img_attn\.proj\.weight", "transformer_blocks.{0}.attn.to_out.0.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj\.weight", "transformer_blocks.{0}.attn.to_add_out.weight"),
    (r"double_blocks\.(\d+)\.img_mod\.lin\.weight", "transformer_blocks.{0}.norm1.linear.weight"),
    (r"double_blocks\.(\d+)\.txt_mod\.lin\.weight", "transformer_blocks.{0}.norm1_context.linear.weight"),
    (r"double_blocks\.(\d+)\.img_mlp\.0\.weight", "transformer_blocks.{0}.ff.net.0.proj.weight"),
    (r"double_blocks\.(\d+)\.img_mlp\.2\.weight", "transformer_blocks.{0}.ff.net.2.weight"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0\.weight", "transformer_blocks.{0}.ff_context.net.0.proj.weight"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2\.weight", "transformer_blocks.{0}.ff_context.net.2.weight"),
    (r"single_blocks\.(\d+)\.linear1\.weight",
     "|".join(f"{m}single_transformer_blocks.{{0}}.{p}.weight"
              for m, p in (("", "attn.to_q"), ("", "attn.to_k"), ("", "attn.to_v"), ("~", "proj_mlp")))),
    (r"single_blocks\.(\d+)\.linear2\.weight", "single_transformer_blocks.{0}.proj_out.weight"),
    (r"single_blocks\.(\d+)\.modulation\.lin\.weight", "single_transformer_blocks.{0}.norm.linear.weight"),
    (r"txt_in\.input_embedder\.weight", "context_embedder.proj_in.weight")])


@dataclass
class Case:
    transformer: str                 # the diffusers transformer class
    config: dict                     # its config at the tiny ComfyUI model's widths
    convert: Callable                # (ComfyUI state dict, its unet_config) -> diffusers state dict
    pipeline: str = ""               # the diffusers pipeline whose LoRA loader reads the file ("": none)
    loader: str = "pipeline"         # "pipeline", "transformer" (its load_lora_adapter), "peft"
    unet: dict = field(default_factory=dict)   # ComfyUI unet_config entries changed to match diffusers
    prefix: str = "transformer."     # how the default ("auto") file names the modules
    # the export's unet_names of the file diffusers reads, per method: "auto" where the default file is
    # the one both read, "diffusers" where diffusers reads only its own names
    diffusers_names: dict = field(default_factory=lambda: {"uce": "auto", "unlearn": "auto"})


CASES = {
    "qwen_image": Case("QwenImageTransformer2DModel",
                       dict(num_layers=2, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64),
                       lambda sd, unet_config: dict(sd), "QwenImagePipeline"),
    # Z-Image's FFN width in diffusers is int(8·dim/3) and ComfyUI's that rounded up to 256: equal at 288
    "z_image": Case("ZImageTransformer2DModel",
                    dict(dim=288, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=[48, 48, 48],
                         axes_lens=[1536, 512, 512]),
                    _single_file("convert_z_image_transformer_checkpoint_to_diffusers"), "ZImagePipeline",
                    unet=dict(dim=288, axes_dims=[48, 48, 48]), prefix="diffusion_model."),
    "flux2": Case("Flux2Transformer2DModel",
                  dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
                       num_attention_heads=2, joint_attention_dim=192, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                       guidance_embeds=True),
                  _single_file("convert_flux2_transformer_checkpoint_to_diffusers"), "Flux2Pipeline",
                  prefix="diffusion_model."),
    # diffusers' Chroma converter hard-codes the real width (3072): ComfyUI's Flux map instead
    "chroma": Case("ChromaTransformer2DModel",
                   dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                        num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 56, 56),
                        approximator_num_channels=64, approximator_hidden_dim=64, approximator_layers=2),
                   _comfy_map("flux_to_diffusers"), "ChromaPipeline"),
    # no LoRA loader in diffusers for PixArt (pipeline or transformer): PEFT on the transformer
    "pixart_sigma": Case("PixArtTransformer2DModel",
                         dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
                              cross_attention_dim=128, caption_channels=64, sample_size=64,
                              use_additional_conditions=False),
                         _comfy_map("pixart_to_diffusers"), loader="peft"),
    "wan21": Case("WanTransformer3DModel",
                  dict(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=64,
                       ffn_dim=512, num_layers=2),
                  _single_file("convert_wan_transformer_to_diffusers"), "WanPipeline", prefix="diffusion_model.",
                  # diffusers' Wan loader fails on a `diffusion_model.` file without a block's layer
                  diffusers_names={"uce": "diffusers", "unlearn": "auto"}),
    "hidream": Case("HiDreamImageTransformer2DModel",
                    dict(patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                         attention_head_dim=128, num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=160,
                         axes_dims_rope=(64, 32, 32), llama_layers=[0, 1]),
                    _single_file("convert_hidream_transformer_to_diffusers"), "HiDreamImagePipeline"),
    "auraflow": Case("AuraFlowTransformer2DModel",
                     dict(sample_size=64, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
                          attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                          caption_projection_dim=128, out_channels=4, pos_embed_max_size=256),
                     _single_file("convert_auraflow_transformer_checkpoint_to_diffusers"), "AuraFlowPipeline"),
    # diffusers' FFN is 4 · dim (times ffn_dim_multiplier), ComfyUI's the same at this config (768)
    "lumina2": Case("Lumina2Transformer2DModel",
                    dict(hidden_size=192, num_layers=2, num_attention_heads=2, num_kv_heads=1,
                         cap_feat_dim=64, axes_dim_rope=(32, 32, 32)),
                    _LUMINA2, "Lumina2Pipeline", prefix="diffusion_model.",
                    diffusers_names={"uce": "diffusers", "unlearn": "diffusers"}),
    "hunyuan_image21": Case("HunyuanImageTransformer2DModel",
                            dict(in_channels=64, out_channels=64, num_attention_heads=2, attention_head_dim=128,
                                 num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=64,
                                 text_embed_2_dim=1472),
                            _HUNYUAN_IMAGE, loader="transformer", prefix="diffusion_model.",
                            diffusers_names={"uce": "diffusers", "unlearn": "diffusers"}),
}


# ---- reading the file ---------------------------------------------------------------------------------
def _pipeline(name: str, transformer):
    """The real pipeline class around the transformer, every other component None (its LoRA loader
    needs none of them)."""
    import inspect
    cls = getattr(diffusers, name)
    kwargs = {p: None for p in inspect.signature(cls.__init__).parameters if p != "self"}
    kwargs.update(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    return cls(**kwargs)


def _diffusers_reads(case: Case, transformer, sd: dict) -> dict[str, torch.Tensor]:
    """Load + fuse the file into the transformer by the family's route; its state dict after."""
    sd = dict(sd)
    if case.loader == "pipeline":
        pipe = _pipeline(case.pipeline, transformer)
        pipe.load_lora_weights(sd)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers
    elif case.loader == "transformer":
        transformer.load_lora_adapter(sd, prefix="transformer")
        transformer.fuse_lora()
        transformer.unload_lora()
    else:
        _peft_merge(transformer, sd)
    return {k: v.detach().clone() for k, v in transformer.state_dict().items()}


def _peft_merge(module, sd: dict) -> None:
    """PEFT's own LoRA layers on the named modules (rank per module, alpha = rank: scale 1), merged."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    assert all(k.startswith("transformer.") for k in sd)
    sd = {k[len("transformer."):]: v for k, v in sd.items()}
    ranks = {k[:-len(".lora_A.weight")]: v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}
    config = LoraConfig(r=1, lora_alpha=1, target_modules=sorted(ranks),
                        rank_pattern={f"^{k}$": r for k, r in ranks.items()},
                        alpha_pattern={f"^{k}$": r for k, r in ranks.items()})
    inject_adapter_in_model(config, module)
    result = set_peft_model_state_dict(module, sd)
    assert not getattr(result, "unexpected_keys", None), result.unexpected_keys
    for m in module.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    # back to the plain module tree: the merged base layers in place of the LoRA wrappers
    for m in list(module.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, LoraLayer):
                setattr(m, child_name, child.get_base_layer())


def _comfyui_reads(model, sd: dict, edit, base: dict) -> None:
    """ComfyUI's LoraLoader code on the file: exactly the edit's keys get patches, each by ΔW."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patched = model.clone()
    patched.add_patches(comfy.lora.load_lora(sd, key_map), 1.0)
    assert {k for k, v in patched.patches.items() if v} == set(edit.changes)
    for key, change in edit.changes.items():
        w = comfy.lora.calculate_weight(patched.patches[key], base[key].float().clone(), key)
        want = change.delta(dtype=torch.float32)
        torch.testing.assert_close(w - base[key].float(), want, rtol=0, atol=_atol(want, base[key]),
                                   msg=lambda m, k=key: f"ComfyUI, {k}: {m}")


def _atol(delta: torch.Tensor, weight: torch.Tensor) -> float:
    """What (W + ΔW) − W can differ from ΔW by in float32: a relative 1e-4 of ΔW, plus the rounding of
    W + ΔW (a few units in the last place of W)."""
    return 1e-4 * float(delta.abs().max()) + 4 * torch.finfo(torch.float32).eps * float(weight.abs().max())


# ---- the edits -------------------------------------------------------------------------------------------
_BUILT: dict = {}


def _edits(comfy, name: str, case: Case):
    """(ComfyUI model, base weights, {"uce": edit or None, "unlearn": edit}) of the family, once."""
    if name in _BUILT:
        return _BUILT[name]
    why = families.missing(name)
    if why:
        pytest.skip(why)
    model, clip, _ = families.build(name, unet=case.unet)
    px = _size(name)
    edits = {}
    with torch.inference_mode():
        base = {k: v.clone() for k, v in model.model_state_dict().items()}
        from conceptedit.comfy_host.patches import model_family
        if model_family(model, clip).adapter.closed_form_note:
            edits["uce"] = None  # HiDream: refused, with what to use instead (tests/test_families_nodes.py)
        else:
            edits["uce"] = _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=clip, concepts="red",
                                 lam=1e-3)[1]
        edits["prune"] = _node(comfy, "ConceptEditConceptPrune", model=model, clip=clip, concepts="red",
                               preset="custom", pairs="a {concept} circle | a circle", skill_ratio=0.05, tau=2,
                               steps=2, cfg=2.0, batch_size=2, width=px, height=px)[1]
        # a large learning rate: after two steps the LoRA's B factors are well away from zero
        edits["unlearn"] = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", method="rgd",
                                 steps=2, lr=1e-2, rank=2, batch=1, n_prompts=2, gen_steps=1, width=px, height=px)[1]
    base = {k: v.float() for k, v in base.items()}
    _BUILT[name] = (model, base, edits)
    return _BUILT[name]


def _weights(case: Case, model, base: dict, edit):
    """(the transformer holding the ComfyUI weights in diffusers' names, those weights converted, the
    same weights plus the edit's ΔW converted)."""
    comfy_w = {k[len("diffusion_model."):]: v for k, v in base.items() if k.startswith("diffusion_model.")}
    edited_w = dict(comfy_w)
    for key, change in edit.changes.items():
        w = comfy_w[key[len("diffusion_model."):]]
        edited_w[key[len("diffusion_model."):]] = w + change.delta(w, dtype=torch.float32).reshape(w.shape)
    unet_config = model.model.model_config.unet_config
    d0, d1 = case.convert(comfy_w, unet_config), case.convert(edited_w, unet_config)
    torch.manual_seed(0)
    transformer = getattr(diffusers, case.transformer)(**case.config).eval()
    own = transformer.state_dict()
    # the converted weights where their shapes agree (parts no edit touches may differ at these widths)
    transformer.load_state_dict({k: v for k, v in d0.items() if k in own and own[k].shape == v.shape}, strict=False)
    return transformer, d0, d1


def _check_moved(before: dict, after: dict, d0: dict, d1: dict) -> None:
    """Exactly the parameters that differ between convert(W) and convert(W + ΔW) moved, by that."""
    expected = {k for k in d1 if not torch.equal(d1[k], d0[k])}
    assert expected and all(k in before and before[k].shape == d1[k].shape for k in expected), \
        sorted(k for k in expected if k not in before or before[k].shape != d1[k].shape)
    assert set(after) == set(before)
    moved = {k for k in before if not torch.equal(after[k], before[k])}
    assert moved == expected, (sorted(moved - expected)[:4], sorted(expected - moved)[:4])
    for k in expected:
        want = d1[k] - d0[k]
        torch.testing.assert_close(after[k] - before[k], want, rtol=0, atol=_atol(want, before[k]),
                                   msg=lambda m, k=k: f"diffusers, {k}: {m}")


@pytest.mark.parametrize("method", ["uce", "unlearn"])
@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_and_comfyui_read_the_family_lora(comfy, name, method):
    case = CASES[name]
    model, base, edits = _edits(comfy, name, case)
    edit = edits[method]
    if edit is None:
        pytest.skip(f"{name} has no closed-form edit")
    assert edit.changes and all(c.kind == "lowrank" for c in edit.changes.values())
    sd, report = edit_to_lora(edit, LoraExportConfig(dtype="float32"))
    assert report["max_rel_error"] == 0.0
    assert all(k.startswith(case.prefix) and (".lora_A." in k or ".lora_B." in k) for k in sd), sorted(sd)[:4]
    _comfyui_reads(model, sd, edit, base)
    if case.diffusers_names[method] != "auto":
        sd, _ = edit_to_lora(edit, LoraExportConfig(dtype="float32", unet_names=case.diffusers_names[method]))
        assert all(k.startswith("transformer.") for k in sd)

    transformer, d0, d1 = _weights(case, model, base, edit)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    _check_moved(before, _diffusers_reads(case, transformer, sd), d0, d1)


@pytest.mark.parametrize("name", list(CASES))
def test_pruning_masks_go_onto_the_diffusers_transformer(comfy, name):
    """diffusers refuses a LoRA file's `.diff` modules: ConceptPrune's masks go on through
    `apply_to_diffusers`, which maps every masked MLP onto the transformer's own parameter."""
    from conceptedit.editing.export.diffusers import apply_to_diffusers
    case = CASES[name]
    model, base, edits = _edits(comfy, name, case)
    edit = edits["prune"]
    assert edit.changes and all(c.kind == "mask" for c in edit.changes.values())
    transformer, d0, d1 = _weights(case, model, base, edit)
    before = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    with torch.no_grad():
        handle = apply_to_diffusers({"transformer": transformer}, edit)
    _check_moved(before, {k: v.detach().clone() for k, v in transformer.state_dict().items()}, d0, d1)
    handle.undo()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())

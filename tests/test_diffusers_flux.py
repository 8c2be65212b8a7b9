"""Flux LoRA files of editing/export/lora.py read by diffusers itself: a real `FluxPipeline` around a
`FluxTransformer2DModel` with the tiny Flux's block structure (2 double, 2 single blocks, hidden 64;
built from its config, random weights, nothing downloaded) `load_lora_weights` the exported file
and `fuse_lora` it; then exactly the weights the edit changes have moved, by the edit's ΔW.

Two namings (`editing.export.lora.file_unet_names`): a closed-form edit of the text projections in
diffusers' PEFT names (``transformer.context_embedder.lora_A.weight``), and a trained edit of the
fused attention ``img_attn.qkv`` in the original names kohya-style, which diffusers splits into
``attn.to_q/to_k/to_v``."""
import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.export.lora import LoraExportConfig, edit_to_lora

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (requirements-dev.txt)")
pytest.importorskip("peft", reason="peft is not installed: diffusers' load_lora_weights needs it")

pytestmark = pytest.mark.usefixtures("one_thread")
FAM = arch.get_family("tiny-flux")


def _pipe():
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12))
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _lowrank(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return Change("lowrank", shape, {"up": torch.randn(shape[0], rank, generator=g) * 0.05,
                                     "down": torch.randn(rank, shape[1], generator=g) * 0.05})


def _fused_delta(pipe, sd):
    before = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(sd)
    pipe.fuse_lora()
    after = pipe.transformer.state_dict()
    return {k.replace(".base_layer", ""): after[k].float() - before[k.replace(".base_layer", "")].float()
            for k in after if k.replace(".base_layer", "") in before and "lora" not in k}


def test_diffusers_reads_the_closed_form_edit_in_peft_names():
    keys = FAM.projection_keys()
    edit = Edit("uce", "tiny-flux", {k: _lowrank(FAM.expected_shapes()[k], 2, i) for i, k in enumerate(keys)})
    edit.check_scope()
    sd, _ = edit_to_lora(edit, LoraExportConfig(dtype="float32"))
    assert all(k.startswith("transformer.") and ".lora_" in k for k in sd)
    got = _fused_delta(_pipe(), sd)
    moved = {k for k, v in got.items() if float(v.abs().max()) > 1e-7}
    assert moved == {"context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"}
    for k in keys:
        want = edit.changes[k].delta(dtype=torch.float32)
        d = FAM.to_diffusers(k)[len("transformer."):]
        torch.testing.assert_close(got[d], want, rtol=0, atol=1e-5)


def test_diffusers_splits_a_fused_qkv_edit_saved_in_kohya_names():
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    edit = Edit("unlearn-esd", "tiny-flux", {key: _lowrank((192, 64), 3, 7)}, params={"param_set": "xattn"})
    edit.check_scope()
    sd, _ = edit_to_lora(edit, LoraExportConfig(dtype="float32"))
    assert {k.rsplit(".", 2)[0] for k in sd} == {"lora_unet_double_blocks_0_img_attn_qkv"}
    got = _fused_delta(_pipe(), sd)
    moved = {k for k, v in got.items() if float(v.abs().max()) > 1e-7}
    assert moved == {f"transformer_blocks.0.attn.to_{p}.weight" for p in "qkv"}
    fused = torch.cat([got[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"])
    torch.testing.assert_close(fused, edit.changes[key].delta(dtype=torch.float32), rtol=0, atol=1e-5)

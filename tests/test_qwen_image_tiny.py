"""The shipped tiny Qwen-Image (tiny/qwen_image.py): a trained model of a layout that is neither a UNet
nor Flux (double-stream blocks only, txt_norm -> txt_in, a causal Qwen2.5 text tower under the chat
template, video-shaped latents), loaded as ComfyUI 0.3.75's own Qwen-Image classes. What it was trained
on is what the CLIP node gives it; the closed form erases a concept from it through its text projection
and the norm in front; stored in float8 it is edited from the exact weights, not refused.
A ComfyUI checkout without Qwen-Image classes (COMFYUI_PATH set to an old one) skips these tests."""
from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_QWEN_IMAGE = importlib.util.find_spec("comfy.ldm.qwen_image") is not None
needs_qwen_image = pytest.mark.skipif(not HAS_QWEN_IMAGE, reason="this ComfyUI (COMFYUI_PATH) has no Qwen-Image classes")


@pytest.fixture(scope="module")
def tiny_qwen(comfy):
    if not HAS_QWEN_IMAGE:
        pytest.skip("this ComfyUI has no Qwen-Image classes")
    from conceptedit.tiny.qwen_image import load_tiny_qwen_image
    return load_tiny_qwen_image()


@needs_qwen_image
def test_comfyui_detects_it_as_qwen_image_and_the_pack_reads_its_own_layout(tiny_qwen):
    import comfy.model_detection
    import comfy.supported_models
    import comfy.text_encoders.qwen_image

    from conceptedit.comfy_host.patches import model_family
    model, clip, _ = tiny_qwen
    sd = {"model.diffusion_model." + k: v for k, v in model.model.diffusion_model.state_dict().items()}
    assert isinstance(comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model."),
                      comfy.supported_models.QwenImage)
    assert isinstance(clip.cond_stage_model, comfy.text_encoders.qwen_image.QwenImageTEModel)
    assert model.model.latent_format.latent_dimensions == 3  # video-shaped, as Qwen-Image's Wan 2.1 format
    fam = model_family(model, clip)
    assert (fam.name, fam.kind, fam.variant) == ("tiny-qwen-image", "qwen_image", "qwen-image")
    assert [(p.key, p.norm) for p in fam.projections] == [("diffusion_model.txt_in.weight", "txt_norm")]
    assert [m.module for m in fam.mlps] == [f"transformer_blocks.{i}.img_mlp.net.2" for i in range(3)]


@needs_qwen_image
def test_the_trainer_encodes_captions_exactly_as_the_clip_node_does(tiny_qwen):
    """The trainer runs the text tower itself (per token length, the system prompt cut where
    QwenImageTEModel cuts it); a mismatch would train the model on text the nodes never give it."""
    from conceptedit.tiny import qwen_image as tq
    from conceptedit.tiny import train_qwen_image as tr
    _, clip, _ = tiny_qwen
    text = tq.build_text()
    text.load_state_dict(tq.read_weights()[1])
    tokens = tr.QwenTokens()
    caps = ["a red circle", "", "a blue triangle in the style of monet", "a green square"]
    with torch.no_grad():
        got = tr.encode(text, tokens, caps)
    assert len(got) >= 3  # several token lengths in one batch, each run at its own length
    for idx, h in got.values():
        for row, i in enumerate(idx):
            cond = clip.encode_from_tokens(clip.tokenize(caps[i]), return_pooled=True, return_dict=True)
            assert cond["pooled_output"] is None
            assert cond["cond"].shape == h[row:row + 1].shape
            torch.testing.assert_close(h[row:row + 1], cond["cond"], rtol=1e-5, atol=1e-5)


@needs_qwen_image
def test_every_token_of_the_worlds_captions_and_prompt_sets_has_a_stored_row(comfy):
    """The trainer keeps only the rows `used_ids` names (and refuses a caption outside them): every id
    of the training captions and of the prompt sets the benchmarks draw must be among them (BPE gives
    a word at a caption's start and after a space different ids)."""
    import random

    from conceptedit.tiny import train_qwen_image as tr
    from conceptedit.tiny import world
    tokens = tr.QwenTokens()
    keep = tr.used_ids(tokens)
    rng = random.Random(0)
    texts = [world.sample_scene(rng).caption for _ in range(400)] + [p for p, _ in world.grid_prompt_set(0)]
    for kind in world.KINDS:
        for concept in world.CONCEPTS[kind]:
            texts += [p for p, _ in world.prompts_for(concept, 12, 0)]
            texts += [p for p, _ in world.synonym_prompts(concept, 12, 0)]
    missing = {t: [i for i in tokens(t)[0] if i not in keep] for t in texts}
    assert not {t: m for t, m in missing.items() if m}


@needs_qwen_image
def test_only_the_used_embedding_rows_are_stored_and_come_back_in_place(tiny_qwen):
    from conceptedit.tiny import qwen_image as tq
    g = torch.Generator().manual_seed(0)
    emb = torch.zeros(1000, 8)
    used = {3, 17, 999}
    emb[sorted(used)] = torch.randn(3, 8, generator=g)
    packed = tq.pack_text_state({tq.EMBED_KEY: emb, "norm.weight": torch.ones(8)}, used)
    assert packed["model.embed_tokens.rows"].shape == (3, 8) and tq.EMBED_KEY not in packed
    back = tq.unpack_text_state(packed, 1000)
    assert torch.equal(back[tq.EMBED_KEY], emb) and torch.equal(back["norm.weight"], torch.ones(8))


@needs_qwen_image
def test_the_closed_form_erases_red_from_the_tiny_qwen_image_and_keeps_the_other_colours(comfy, tiny_qwen, one_thread):
    """Behaviour on the trained model, read by the tiny world's classifier (4 prompts x 4 samples). The
    closed form halves red here (bench_flux --model tiny-qwen-image: 100 % -> 44 % over 48 pictures, the
    other colours kept), much less than on the tiny Flux: the causal encoder spreads the word over the
    rows after it; the bounds are what it reaches, with three pictures of margin."""
    from conceptedit.comfy_host.view import apply_edit
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.editing.audit.evaluate import default_classifier, evaluate
    from conceptedit.editing.uce.config import UCEConfig
    from conceptedit.tiny import world
    from conceptedit.tiny.comfy_model import comfy_sampler
    from conceptedit.tiny.qwen_image import QWEN_CFG
    model, clip, _ = tiny_qwen
    classify = default_classifier()
    with torch.inference_mode():
        edit = run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"]))).edit
        edited = apply_edit(model, clip, edit)[0]
    assert set(edit.changes) == {"diffusion_model.txt_in.weight"}

    def share(m, concept):
        r = evaluate(comfy_sampler(m, clip, steps=12, cfg=QWEN_CFG), world.prompts_for(concept, 4, 0), 4, classify)
        return r.presence.get(concept, 0.0)

    assert share(model, "red") >= 0.9
    assert share(edited, "red") <= 0.6875
    for other in ("blue", "green"):
        assert share(edited, other) >= 0.75, other


@needs_qwen_image
@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_stored_in_float8_it_is_edited_from_the_exact_weights_and_the_rounding_is_reported(comfy, tiny_qwen):
    from conceptedit.comfy_host.view import apply_edit
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.editing.uce.config import UCEConfig
    from conceptedit.tiny.qwen_image import load_tiny_qwen_image
    model8, clip, _ = load_tiny_qwen_image(dtype=torch.float8_e4m3fn)
    key = "txt_in.weight"
    stored = model8.model.diffusion_model.txt_in.weight
    assert stored.dtype == torch.float8_e4m3fn
    before = stored.view(torch.uint8).clone()
    edit8 = run("uce", model8, clip, UCEJob(settings=UCEConfig(concepts=["red"]))).edit
    # exact: the same solve as on a float model holding the stored values (txt_in and the norm in front)
    ref, _, _ = load_tiny_qwen_image()
    dm8, dm = model8.model.diffusion_model, ref.model.diffusion_model
    assert (dm.txt_in.weight - stored.float()).abs().max() > 0  # float8 storage did round the weights
    with torch.no_grad():
        dm.txt_in.weight.copy_(stored.float())
        dm.txt_norm.weight.copy_(dm8.txt_norm.weight.float())
    edit_ref = run("uce", ref, clip, UCEJob(settings=UCEConfig(concepts=["red"]))).edit
    delta8 = edit8.changes["diffusion_model." + key].delta(dtype=torch.float32)
    assert delta8.norm() > 0
    torch.testing.assert_close(delta8, edit_ref.changes["diffusion_model." + key].delta(dtype=torch.float32),
                               rtol=1e-4, atol=1e-6)
    patched, _, warnings = apply_edit(model8, clip, edit8)
    assert any("float8_e4m3fn" in w and "rounding error" in w for w in warnings), warnings
    assert torch.equal(model8.model.diffusion_model.txt_in.weight.view(torch.uint8), before) and not model8.patches
    from conceptedit.tiny.comfy_model import comfy_sampler
    x = comfy_sampler(patched, clip, steps=2, cfg=3.0)(["a red circle"], [0])
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()
    # a loaded clone patches the shared module in place; ComfyUI restores it on unloading
    import comfy.model_management as mm
    mm.unload_all_models()
    assert torch.equal(model8.model.diffusion_model.txt_in.weight.view(torch.uint8), before)

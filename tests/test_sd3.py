"""SD3's text path in the current ComfyUI: ComfyUI's own `SD3ClipModel` (CLIP-L ‖ CLIP-G padded to
4096, then T5 along the tokens; pooled L ‖ G) at small widths with SD3's tokenizers, and ComfyUI's
SD3 model class reading it (`helpers.sd3_clip`, `helpers.sd3_model`, random weights). EMCID edits all
three encoders through the real node and job, its LoRA is read back by LoraLoader, the closed
form and unlearning run on the 16-channel flow model, and the red team's soft prompts go into the
CLIPs. The 2024-03 ComfyUI has no SD3 class."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import replace

import pytest
import torch

from helpers import sd3_clip, sd3_model


def _has_sd3() -> bool:
    try:  # the 2024-03 copy has no comfy.text_encoders package at all
        return importlib.util.find_spec("comfy.text_encoders.sd3_clip") is not None
    except ModuleNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _has_sd3(), reason="this ComfyUI has no SD3 classes (the 2024-03 copy)")

PROMPTS = ["a photo of red", "a blue square on a wooden table, seen from above"]


@pytest.fixture(scope="module")
def sd3(comfy):
    return sd3_model(), sd3_clip()


@pytest.mark.parametrize("t5,masked,clip_l", [(True, False, True), (True, True, True), (False, False, True),
                                              (True, False, False)])
@torch.inference_mode()
def test_the_text_path_is_comfyuis_sd3_encode(comfy, t5, masked, clip_l):
    """With and without T5, T5 with its attention mask (SD3's t5_attention_mask: it attends only up
    to EOS), and without CLIP-L (DualCLIPLoader's CLIP-G + T5: 768 zeros stand in for CLIP-L)."""
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    clip = sd3_clip(t5=t5, t5_attention_mask=masked, clip_l=clip_l)
    text = ComfyTextModel(clip)
    assert text.path == "sd3" and text.encoders == (("clip_l",) * clip_l + ("clip_g",) + ("t5xxl",) * t5)
    ids, n_real = text.tokenize(PROMPTS)
    cond, pooled = text.context(ids)
    lg = 64 + 96 if clip_l else 768 + 96
    assert cond.shape == (2, 154 if t5 else 77, 4096) and pooled.shape == (2, lg)
    for i, p in enumerate(PROMPTS):
        want, want_pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        torch.testing.assert_close(cond[i:i + 1], want.float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled[i:i + 1], want_pooled.float(), rtol=0, atol=1e-5)
    assert float(cond[:, :77, lg:].abs().max()) == 0  # L ‖ G fill the first columns, the rest is the 4096 pad
    assert int(n_real["clip_g"][0]) == 4 and (not clip_l or n_real["clip_l"].tolist() == n_real["clip_g"].tolist())


@torch.inference_mode()
def test_a_prompt_longer_than_t5s_77_tokens_is_cut_there_and_batches_with_short_ones(comfy, sd3):
    """ComfyUI's SD3 T5 tokenizer grows a long prompt's row past 77; the method's text path cuts it
    to 77 (EOS last), so a batch with short prompts and "" keeps one shape and the short prompts'
    contexts stay exactly ComfyUI's."""
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    _, clip = sd3
    long = ", ".join(["a red circle on a blue square"] * 20)
    assert len(clip.tokenize(long)["t5xxl"][0]) > 77
    text = ComfyTextModel(clip)
    ids, n_real = text.tokenize([long, PROMPTS[0], ""])
    assert ids["t5xxl"].shape == (3, 77) and int(ids["t5xxl"][0, -1]) == 1 and int(n_real["t5xxl"][0]) == 76
    cond, _ = text.context(ids)
    assert cond.shape == (3, 154, 4096)
    for i, p in ((1, PROMPTS[0]), (2, "")):
        want, _ = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        torch.testing.assert_close(cond[i:i + 1], want.float(), rtol=0, atol=1e-5)
    # the host's own encode (every other method): a long prompt's CLIP part is several chunks (77
    # rows) before T5's; the cut keeps the first 77 of each, so T5 is not cut away
    from conceptedit.comfy_host.text import ComfyText
    whole, _ = clip.encode_from_tokens(clip.tokenize(long), return_pooled=True)
    clip_rows = 77 * len(clip.tokenize(long)["l"])
    assert clip_rows >= 154 and whole.shape[1] > clip_rows + 77
    got = ComfyText(clip).encode([long])
    assert got.shape == (1, 154, 4096)
    torch.testing.assert_close(got[:, :77], whole[:, :77].float(), rtol=0, atol=0)
    torch.testing.assert_close(got[:, 77:], whole[:, clip_rows:clip_rows + 77].float(), rtol=0, atol=0)


def _context(clip, prompt: str) -> torch.Tensor:
    cond, _ = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return cond[0].float()


def _states(clip, prompt: str, layers: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each encoder's residual stream after its layer `layers[e]` [L, d], as ComfyUI's encode runs it."""
    got, handles = {}, []
    csm = clip.cond_stage_model
    for e, i in layers.items():
        t = getattr(csm, e).transformer
        block = t.encoder.block[i] if e == "t5xxl" else t.text_model.encoder.layers[i]
        handles.append(block.register_forward_hook(
            lambda m, a, o, e=e: got.__setitem__(e, (o[0] if isinstance(o, tuple) else o)[0].detach().float().clone())))
    try:
        clip.encode_from_tokens(clip.tokenize(prompt))
    finally:
        for h in handles:
            h.remove()
    return got


def test_emcid_edits_clip_l_clip_g_and_t5_moves_the_concept_and_its_lora_is_read_back(comfy, sd3, loras):
    """Stage 1 runs through the SD3 model (its y = the pooled L ‖ G); stage 2
    on the three encoders, aimed at the destination's own states, moves the concept's state after
    the last edited layer towards the destination's in each of CLIP-L, CLIP-G and T5 while a generic
    prompt's states barely move; the input CLIP is untouched, and the LoRA names the encoders as
    LoraLoader numbers them on SD3 (lora_te1 CLIP-L, lora_te2 CLIP-G, lora_te3 T5)."""
    from safetensors import safe_open

    from conceptedit.comfy_host.patches import original_weights
    from conceptedit.comfy_host.jobs import EmcidJob, run
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.editing.export.lora import LoraExportConfig, save_lora
    from test_flux import _assert_loraloader_reads
    model, clip = sd3
    before = {k: v.clone() for k, v in clip.patcher.model_state_dict().items()}
    cfg = EmcidConfig(lam={"clip_l": 500.0, "clip_g": 500.0, "t5xxl": 20.0}, steps=3, sample_steps=2, n_captions=200,
                      templates=("a photo of {}",))  # one template: the target is that prompt's own state
    with torch.inference_mode():
        r = run("emcid", model, clip, EmcidJob(pairs=[("red", "purple")], settings=cfg, width=64, height=64,
                                               cache_dir=str(loras / "cache")))
    stage1 = r.edit.metrics["stage1"]  # random weights: its losses are tiny and say nothing of quality
    assert stage1["cached"] == 0 and all(math.isfinite(v) for v in stage1["probe_loss_after"])
    assert {k.split(".")[0] for k in r.edit.changes} == {"clip_l", "clip_g", "t5xxl"}
    assert r.edit.params["residual"] == {"clip_l": "official", "clip_g": "official", "t5xxl": "memit"}
    assert r.edit.params["family_defaults"]["table"] == "sd3-medium"
    # MEMIT's residual on every encoder: the official one aims each fc2 output at the target, which
    # on random weights overshoots (its gap grows), a property of that rule and not of SD3's path
    with torch.inference_mode():
        r = run("emcid", model, clip, EmcidJob(pairs=[("red", "purple")],
                                               settings=replace(cfg, use_stage1=False, residual="memit")))
    edit = r.edit
    layers = {"clip_l": 2, "clip_g": 2, "t5xxl": 0}  # the last edited layer of each (all but the last)
    assert {k.split(".")[0] for k in edit.changes} == set(layers)
    assert all(m["gap_after"] < 0.5 for m in edit.metrics["stage2"].values()), edit.metrics["stage2"]
    assert not clip.patcher.patches and r.clip.patcher.patches
    assert all(torch.equal(v, before[k]) for k, v in clip.patcher.model_state_dict().items())
    with torch.inference_mode():
        src0, src1 = _states(clip, "a photo of red", layers), _states(r.clip, "a photo of red", layers)
        dst = _states(clip, "a photo of purple", layers)
        gen0, gen1 = _states(clip, PROMPTS[1], layers), _states(r.clip, PROMPTS[1], layers)
    _, n_src = ComfyTextModel(clip).tokenize(["a photo of red"])
    _, n_dst = ComfyTextModel(clip).tokenize(["a photo of purple"])
    for e in layers:
        first = 0 if e == "t5xxl" else 1  # the concept's last token: after BOS on CLIP, T5 has none
        at, to = int(n_src[e][0]) - 1 + first, int(n_dst[e][0]) - 1 + first
        moved, gap = (src1[e][at] - dst[e][to]).norm(), (src0[e][at] - dst[e][to]).norm()
        assert float(moved) < 0.5 * float(gap), e
        change, generic = (src1[e][at] - src0[e][at]).norm(), (gen1[e] - gen0[e]).norm(dim=-1)
        assert float(generic.mean()) < 0.15 * float(change) and float(generic.max()) < 0.4 * float(change), e
    path = loras / "sd3_emcid.safetensors"
    save_lora(edit, str(path), LoraExportConfig(dtype="float32"), base=original_weights(clip.patcher))
    with safe_open(str(path), "pt") as f:
        prefixes = {k.split(".")[0].split("_")[1] for k in f.keys()}
    assert prefixes == {"te1", "te2", "te3"}
    # the CLIP is held in float16 here (ComfyUI's text-encoder dtype): W + ΔW rounds there
    _assert_loraloader_reads(comfy, model, clip, edit, path, before, text=True, rel_atol=1e-3)


def test_a_clip_g_and_t5_edit_is_named_as_loraloader_reads_it(comfy, loras):
    """DualCLIPLoader's SD3 CLIP of CLIP-G + T5: ComfyUI reads CLIP-G as lora_te (not te1) there and
    T5 as lora_te2; the exported LoRA names them so and LoraLoader applies both."""
    from safetensors import safe_open

    from conceptedit.comfy_host.patches import original_weights
    from conceptedit.comfy_host.jobs import EmcidJob, run
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.editing.export.lora import LoraExportConfig, save_lora
    from helpers import SD3_POOLED_NO_L
    from test_flux import _assert_loraloader_reads
    model, clip = sd3_model(pooled=SD3_POOLED_NO_L), sd3_clip(clip_l=False)
    before = {k: v.clone() for k, v in clip.patcher.model_state_dict().items()}
    with torch.inference_mode():
        job = EmcidJob(pairs=[("red", "purple")],
                       settings=EmcidConfig(lam={"clip_g": 50.0, "t5xxl": 5.0}, use_stage1=False, n_captions=60))
        r = run("emcid", model, clip, job)
    # (small λ: a ΔW well above float16's rounding of W + ΔW, in which this CLIP is held)
    assert {k.split(".")[0] for k in r.edit.changes} == {"clip_g", "t5xxl"}
    path = loras / "sd3_g_t5.safetensors"
    save_lora(r.edit, str(path), LoraExportConfig(dtype="float32"), base=original_weights(clip.patcher))
    with safe_open(str(path), "pt") as f:
        prefixes = {k.split(".")[0].split("_")[1] for k in f.keys()}
    assert prefixes == {"te", "te2"}
    _assert_loraloader_reads(comfy, model, clip, r.edit, path, before, text=True, rel_atol=1e-3)


def test_emcid_node_runs_on_sd3(comfy, sd3, loras, monkeypatch):
    """The node on SD3 (a CLIP of another model is refused in tests/test_mmdit.py). C₀ from 100
    generic captions instead of 2,000 keeps it to seconds."""
    import functools

    import conceptedit.nodes.nodes_emcid as ne
    from test_layout_matrix import _node
    model, clip = sd3
    monkeypatch.setattr(ne, "emcid_cache_dir", lambda: str(loras / "cache"))
    monkeypatch.setattr(ne, "EmcidConfig", functools.partial(ne.EmcidConfig, n_captions=100))
    with torch.inference_mode():
        out_clip, edit, report = _node(comfy, "ConceptEditTextEncoderEdit", model=model, clip=clip,
                                       concepts="red -> purple\ncircle -> square", use_stage1=False)
    assert edit.concepts == ["red -> purple", "circle -> square"] and edit.params["n_captions"] == 100
    assert '"t5xxl"' in report and out_clip.patcher.patches and not clip.patcher.patches
    assert {k.split(".")[0] for k in out_clip.patcher.patches} == {"clip_l", "clip_g", "t5xxl"}


@torch.inference_mode()
def test_a_clip_of_the_right_text_width_but_another_pooled_width_is_refused(comfy, sd3):
    """Flux's and SD3's CLIPs both give 4096-wide text: the pooled vector the model reads itself
    (SD3 y_embedder, Flux vector_in) tells them apart. Here a CLIP-G + T5 CLIP (pooled 768 + 96)
    on a model that reads L ‖ G (64 + 96)."""
    from conceptedit.editing.errors import ConceptEditError
    from test_layout_matrix import _node
    model, _ = sd3
    with pytest.raises(ConceptEditError, match="gives a pooled vector 864 wide, but this SD3-layout .* reads a "
                                               "pooled vector 160 wide: connect the CLIP of the model's own"):
        _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=sd3_clip(clip_l=False), concepts="red")
    assert not model.patches


@torch.inference_mode()
def test_closed_form_edits_context_embedder_and_y_embedder_only(comfy, sd3):
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.editing.uce.config import UCEConfig
    model, clip = sd3
    r = run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"], edit_text_pooled=True,
                                                          preserve=["a blue square", "a green circle"],
                                                          default_preserve=False)))
    assert set(r.edit.changes) == {"diffusion_model.context_embedder.weight", "diffusion_model.y_embedder.mlp.0.weight"}
    assert r.edit.family == "custom" and not model.patches and r.model.patches
    assert r.edit.changes["diffusion_model.y_embedder.mlp.0.weight"].shape == (128, 64 + 96)


def test_unlearning_trains_on_sd3s_16_channel_flow_latents(comfy, sd3):
    from test_layout_matrix import _node
    model, clip = sd3
    with torch.inference_mode():
        out, edit, _plot = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", steps=2,
                                 n_prompts=2, gen_steps=2, batch=2, width=64, height=64)
    assert edit.changes and all(k.startswith("diffusion_model.joint_blocks.") for k in edit.changes)
    assert out.patches and not model.patches


@torch.inference_mode()
def test_pictures_drawn_from_noise_have_the_models_channels_and_the_size_asked(comfy, sd3):
    """DDIM from noise (the red team's targets, ESD's x_t) on SD3's 16-channel latents, 8 x 12."""
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    from conceptedit.editing.diffusion import ddim_sample
    from conceptedit.editing.hosts import conditioning
    model, clip = sd3
    host = ComfyDenoiser(model, clip, latent_hw=(8, 12))
    cond, y = conditioning(host, host.text, ["a red circle"])
    uncond, y_uncond = conditioning(host, host.text, [""])
    x = ddim_sample(host, cond, uncond, steps=2, cfg=4.0, seed=0, y=y, y_uncond=y_uncond)
    assert x.shape == (1, 16, 8, 12) and torch.isfinite(x).all()


@torch.inference_mode()
def test_red_team_soft_prompts_go_into_the_clips_and_t5_reads_the_rest(comfy, sd3):
    from conceptedit.comfy_host.text_hooks import SoftComfyText
    from test_layout_matrix import _node
    model, clip = sd3
    text = SoftComfyText(clip)
    assert text.soft_encoders == ["clip_l", "clip_g"] and [v.shape[1] for v in text.vocabulary()] == [64, 96]
    prompt = "sks sks a red circle"
    soft = [torch.randn(2, 64) * 0.02, torch.randn(2, 96) * 0.02]
    cond, pooled = text.encode_soft([prompt], soft)
    plain, _ = text.encode_soft([prompt], None)
    # T5 reads "a red circle" (its rows are those of the prompt without the placeholders)
    want_t5 = _context(clip, "a red circle")[77:]
    torch.testing.assert_close(cond[0, 77:].float(), want_t5, rtol=0, atol=1e-5)
    assert float((cond[0, :77] - plain[0, :77]).abs().max()) > 1e-4  # the soft tokens reach the CLIP rows
    assert pooled.shape == (1, 160)
    assert text.decode([320]) == "a"  # CLIP's vocabulary: a projected prompt is words
    # the audit of a text-encoder edit: the attacks run through the edited CLIP
    from conceptedit.comfy_host.jobs import EmcidJob, run
    from conceptedit.editing.emcid.config import EmcidConfig
    r = run("emcid", model, clip, EmcidJob(pairs=[("red", "purple")], settings=EmcidConfig(use_stage1=False, n_captions=100)))
    out = _node(comfy, "ConceptEditRedTeamAudit", edited_model=model, original_model=model, clip=clip, concept="red",
                concept_prompts="a red circle", steps=2, samples=1, sample_steps=2, inversion=False,
                revival=False, edit=r.edit, edited_clip=r.clip, width=64, height=64)
    report, _grid, rate = out.result
    assert "prefix" in report and "embedding" in report and 0.0 <= rate <= 1.0, report
    assert not clip.patcher.patches

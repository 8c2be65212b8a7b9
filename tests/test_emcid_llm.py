"""EMCID (the Text Encoder Edit node) and the red team's prompt attacks on the text encoders the 2025-26
families read in ComfyUI 0.3.75, built by tests/families.py with ComfyUI's own encoder classes and
tokenizers at tiny widths (random weights): Chroma's T5 alone (each prompt its own length), Wan's umT5
(padded to 512, masked), and the LLM encoders of Qwen-Image (Qwen2.5-VL, its system prompt dropped
from the context), Z-Image (Qwen3, read at its penultimate layer) and Flux.2 (Mistral 3, three hidden
layers stacked along the width, left-padded).

- the edit changes exactly the MLP output projections of the layers the family's rule picks, none
  after the layer the model reads; a layer after it is refused;
- the edited CLIP's context for the source concept moves toward the destination's (rows from the
  concept's last token on, in the edit's templates and in one it never saw), kept prompts barely move;
- the input CLIP (and MODEL) stay bit-identical; the edit saved, loaded and applied gives the same CLIP,
  and its LoRA export is read back by ComfyUI's LoraLoader onto exactly the edited weights;
- soft tokens take exactly the placeholders' place (a real word's embeddings give that word's prompt),
  on those families and on Lumina 2's Gemma 2;
- the Red-Team Audit node runs a prompt attack against the EMCID edit on each family;
- HiDream (four encoders) and EMCID on Lumina 2 (Gemma 2 normalises its MLP outputs) are refused,
  saying what to use instead.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("comfy.ldm.qwen_image") is None:
    pytest.skip("this ComfyUI predates the 2025-26 text encoders (the 2024-03 copy): set COMFYUI_PATH to "
                "ComfyUI 0.3.75", allow_module_level=True)

import families  # noqa: E402
from test_families_build import _size  # noqa: E402
from test_layout_matrix import _node, _patched_keys  # noqa: E402

from conceptedit.comfy_host.text import ComfyText  # noqa: E402
from conceptedit.editing.errors import ConceptEditError, InvalidInputError  # noqa: E402

FAMILIES = ("chroma", "qwen_image", "z_image", "flux2", "wan21")
# the MLP output projections EMCID edits by default on each tiny build: T5 (2 layers) its first, as the
# tiny T5's table; an LLM MEMIT's band up to the layer the model reads (Qwen-Image reads the last of 4
# layers: 0, 1; Z-Image the second of 3 and Flux.2 the states going into layers 1-3 of 4, the last
# being layer 2's output: 0)
EDITED = {"chroma": ["t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"],
          "wan21": ["umt5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"],
          "qwen_image": [f"qwen25_7b.transformer.model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)],
          "z_image": ["qwen3_4b.transformer.model.layers.0.mlp.down_proj.weight"],
          "flux2": ["mistral3_24b.transformer.model.layers.0.mlp.down_proj.weight"]}
READ_LAYER = {"qwen_image": 3, "z_image": 1, "flux2": 2}
TEMPLATES = ("a photo of {}", "a {} circle")
UNSEEN = "a large {} square"          # a template the edit never read
KEPT = ("a photo of a dog", "a green square", "a cat on a chair")
LAM = 1.0  # relative λ (per key dimension): these random encoders' keys are unlike a trained CLIP's


@pytest.fixture
def emcid_node(comfy, monkeypatch, tmp_path):
    """The node with its caches in a temporary folder and C₀ from 300 captions (2000 by default)."""
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.nodes import nodes_emcid
    monkeypatch.setattr(nodes_emcid, "emcid_cache_dir", lambda: str(tmp_path / "emcid"))
    monkeypatch.setattr(nodes_emcid, "EmcidConfig", functools.partial(EmcidConfig, n_captions=300))

    def run(model, clip, **kw):
        kw = {"concepts": "red -> blue", "lam": LAM, "use_stage1": False, "templates": "\n".join(TEMPLATES), **kw}
        return _node(comfy, "ConceptEditTextEncoderEdit", clip=clip, model=model, **kw)
    return run


def _own(clip, prompt):
    """The prompt's context as ComfyUI's CLIPTextEncode makes it."""
    return clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)[0][0].float()


def _concept_rows(clip, template, word):
    """The context rows of `template` with `word` from the word's last token to the end of the prompt's own
    rows (its EOS, or the chat template's closing rows, which the model reads too), found by `ComfyText`."""
    text = ComfyText(clip)
    prompt = template.format(word)
    (_, ids, start, eos, _), = text.token_segments(prompt)
    (_, head, _, _, _), = text.token_segments(template.split("{}")[0] + word)
    n_head = (head.index(eos, start) if eos >= 0 and eos in head[start:] else len(head)) - start
    end = len(ids) if text.context_varies else ids.index(eos, start) + 1
    return _own(clip, prompt)[start + n_head - 1:end]


def _state(patcher):
    return {k: v.clone() for k, v in patcher.model_state_dict().items()}


def _same(patcher, before):
    after = patcher.model_state_dict()
    return set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", FAMILIES)
def test_text_encoder_edit_moves_the_concept_and_keeps_the_rest(comfy, one_thread, loras, emcid_node, name):
    import folder_paths
    model, clip, _ = families.built(name)
    with torch.inference_mode():
        clip_before, model_before = _state(clip.patcher), _state(model)
        out_clip, edit, report = emcid_node(model, clip)
        # exactly the intended layers, as patches on a clone
        assert edit.method == "emcid" and sorted(edit.changes) == EDITED[name]
        assert out_clip is not clip and _patched_keys(out_clip.patcher) == set(EDITED[name])
        assert '"gap_after"' in report
        # the source concept's rows move toward the destination's, in the edit's templates and an unseen one
        moved = []
        for template in TEMPLATES + (UNSEEN,):
            src, dst = _concept_rows(clip, template, "red"), _concept_rows(clip, template, "blue")
            new = _concept_rows(out_clip, template, "red")
            assert src.shape == dst.shape == new.shape
            before, after = float((src - dst).norm()), float((new - dst).norm())
            assert after < 0.7 * before, (template, before, after)
            moved.append(float((new - src).norm() / src.norm()))
        # kept prompts barely move: under a tenth of their norm and under half the least the concept moved
        for prompt in KEPT:
            c0, c1 = _own(clip, prompt), _own(out_clip, prompt)
            change = float((c1 - c0).norm() / c0.norm())
            assert change < 0.1 and change < 0.5 * min(moved), (prompt, change, moved)
        # the inputs are untouched (once the edited clone, which shares their modules, is unloaded)
        import comfy.model_management as mm
        mm.unload_all_models()
        assert not clip.patcher.patches and _same(clip.patcher, clip_before) and _same(model, model_before)

        # the edit as a file: saved, loaded (validated), applied to the original CLIP -> the same CLIP
        _node(comfy, "ConceptEditSaveEdit", edit=edit, filename=f"emcid_llm_{name}")
        loaded, _ = _node(comfy, "ConceptEditLoadEdit", edit_name=f"emcid_llm_{name}.safetensors")
        assert sorted(loaded.changes) == sorted(edit.changes) and loaded.fingerprint == edit.fingerprint
        for key, change in edit.changes.items():
            assert torch.equal(loaded.changes[key].delta(), change.delta())
        _, applied, _ = _node(comfy, "ConceptEditApplyEdit", model=model, edit=loaded, strength=1.0, clip=clip)
        assert _patched_keys(applied.patcher) == set(edit.changes)
        assert torch.allclose(_own(applied, "a photo of red"), _own(out_clip, "a photo of red"), atol=1e-5)
        # and as a LoRA that ComfyUI's own loader maps onto exactly the edited weights
        _node(comfy, "ConceptEditExportLoRA", edit=edit, filename=f"emcid_llm_{name}", model=model, clip=clip)
        assert os.path.isfile(folder_paths.get_full_path("loras", f"emcid_llm_{name}.safetensors"))
        lm, lc = comfy.LoraLoader().load_lora(model, clip, f"emcid_llm_{name}.safetensors", 1.0, 1.0)
        assert _patched_keys(lc.patcher) == set(edit.changes) and not _patched_keys(lm)
        via_lora, want = _own(lc, "a photo of red"), _own(out_clip, "a photo of red")
        assert float((via_lora - want).norm() / want.norm()) < 1e-2  # the file's float16 factors
        mm.unload_all_models()
        assert _same(clip.patcher, clip_before)


@pytest.mark.parametrize("name", ["qwen_image", "chroma"])
def test_stage1_trains_through_the_models_own_prediction(one_thread, emcid_node, name):
    """Stage 1 (two steps, small pictures) on an LLM and a T5-only family: δ is optimised through the
    model's own prediction path and the result still edits only the intended layers."""
    model, clip, _ = families.built(name)
    px = _size(name)
    with torch.inference_mode():
        before = _state(clip.patcher)
        _, edit, _ = emcid_node(model, clip, use_stage1=True, steps=2, width=px, height=px,
                                templates="a photo of {}")
        plain = emcid_node(model, clip, templates="a photo of {}")[1]
        import comfy.model_management as mm
        mm.unload_all_models()
    assert sorted(edit.changes) == EDITED[name] and len(edit.metrics["stage1"]["probe_loss_after"]) == 1
    assert any(not torch.equal(edit.changes[k].delta(), plain.changes[k].delta()) for k in edit.changes)
    assert all(torch.isfinite(c.delta()).all() for c in edit.changes.values()) and _same(clip.patcher, before)


@pytest.mark.parametrize("name", ["flux2", "z_image"])
def test_layers_after_the_read_layer_are_refused(comfy, one_thread, tmp_path, name):
    """An LLM's layers after the one the model reads change nothing it reads: asking for one is refused."""
    from conceptedit.comfy_host.jobs import EmcidJob, run as run_job
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    from conceptedit.editing.emcid.config import EmcidConfig
    model, clip, _ = families.built(name)
    text = ComfyTextModel(clip)
    enc = text.encoders[0]
    assert text.read_layer(enc) == READ_LAYER[name]
    cfg = EmcidConfig(use_stage1=False, layers={enc: (READ_LAYER[name] + 1,)}, n_captions=20)
    with torch.inference_mode(), pytest.raises(InvalidInputError, match="changes nothing"):
        run_job("emcid", model, clip, EmcidJob(pairs=[("red", "blue")], settings=cfg, cache_dir=str(tmp_path)))


def _word_tokens(text, word):
    """The single encoder's tokens of `word` in "a <word> circle" (the placeholders' count)."""
    a, full, tail = text._own("a"), text._own(f"a {word} circle"), text._own("a circle")
    return full[len(a):len(full) - (len(tail) - len(a))]


@pytest.mark.parametrize("name", FAMILIES + ("lumina2",))
def test_soft_tokens_take_exactly_the_placeholders_place(comfy, one_thread, name):
    """Soft vectors equal to a word's token embeddings give the encoding of the prompt with that word,
    and project back to it (Lumina 2's Gemma too, which EMCID refuses but the attacks reach)."""
    from conceptedit.comfy_host.text_hooks import SoftComfyText
    from conceptedit.editing.redteam.soft import nearest_tokens, project
    _, clip, _ = families.built(name)
    text = SoftComfyText(clip)
    with torch.inference_mode():
        word = _word_tokens(text, "red")
        slots = " ".join([text.placeholder] * len(word))
        soft = [text.vocabulary()[0][torch.tensor(word)].float()]
        got, _ = text.encode_soft([f"a {slots} circle", f"{slots} on a table"], soft)
        want, _ = text.encode_soft(["a red circle", "red on a table"], None)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        assert got.shape == want.shape and not torch.allclose(got[1], want[0])
        assert nearest_tokens(text, soft) == word
        assert project(text, [f"a {slots} circle"], soft)[0].replace(",", "").split() == ["a", "red", "circle"]
        with pytest.raises(InvalidInputError, match="placeholder"):
            text.encode_soft(["a red circle"], soft)


@pytest.mark.parametrize("name", FAMILIES)
def test_red_team_node_attacks_an_emcid_edit(comfy, one_thread, emcid_node, name):
    """The Red-Team Audit node, a prefix attack of two steps against the EMCID edit (the edited CLIP's
    soft prompts through the family's own model): it runs, reports, draws, and changes no input."""
    model, clip, _ = families.built(name)
    px = _size(name)
    with torch.inference_mode():
        out_clip, edit, _ = emcid_node(model, clip)
        model_before, clip_before = _state(model), _state(clip.patcher)
        res = _node(comfy, "ConceptEditRedTeamAudit", edited_model=model, original_model=model, clip=clip,
                    concept="red", concept_prompts="a red circle", prefix=True, embedding_match=False,
                    inversion=False, revival=False, steps=2, tokens=2, samples=1, sample_steps=1, cfg=1.0,
                    edit=edit, edited_clip=out_clip, width=px, height=px)
        import comfy.model_management as mm
        mm.unload_all_models()
    text, grid, success = res.result
    assert "prefix (2 tokens, 2 steps" in text and "a red circle'" in text and 0.0 <= success <= 1.0
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert _same(model, model_before) and _same(clip.patcher, clip_before) and not model.patches


def test_hidream_and_emcid_on_lumina2_are_refused_saying_what_to_use(comfy, emcid_node):
    from conceptedit.comfy_host.text_hooks import ComfyTextModel
    for name, match in (("hidream", "Unlearn Concept or ConceptPrune"), ("lumina2", "Cross-Attention Edit")):
        model, clip, _ = families.built(name)
        with torch.inference_mode(), pytest.raises(ConceptEditError, match=match):
            emcid_node(model, clip)
    with pytest.raises(InvalidInputError, match="QuadrupleCLIPLoader|several|leaves the concept"):
        ComfyTextModel(families.built("hidream")[1])

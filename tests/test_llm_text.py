"""The LLM text encoders of ComfyUI 0.3.75 through `ComfyText` and the closed form's text rows, on the
tiny real builds of tests/families.py (ComfyUI's own encoder classes and tokenizers, random weights):
Qwen-Image's and HunyuanImage 2.1's Qwen2.5-VL (chat template, its system prefix dropped from the
context), Z-Image's Qwen3 and Flux.2's Mistral 3 (template kept; Flux.2 pads on the left), Lumina 2's
bare Gemma 2 (BOS, no token after the text). Every prompt's context has its own length there.

- the rows `token_segments` names for a prompt's words are the rows where two prompts that differ in
  one word first differ, and the rows before them (the template) are the same;
- a batch of prompts of different lengths is each prompt's own encode, zero rows around it;
- the closed form on the model's own text projection (behind its norm) sends the concept's rows to
  the guide's and keeps the preserve prompts';
- HiDream's Llama states reach the model on the denoiser's own path (`ComfyDenoiser.eps`), and a
  padded context reaches it as the prompt's own.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("comfy.ldm.qwen_image") is None:
    pytest.skip("this ComfyUI predates the LLM text encoders (the 2024-03 copy): set COMFYUI_PATH to "
                "ComfyUI 0.3.75", allow_module_level=True)

import families  # noqa: E402
from test_layout_matrix import _node  # noqa: E402

from conceptedit.comfy_host.denoiser import ComfyDenoiser  # noqa: E402
from conceptedit.comfy_host.patches import model_family, patched_weights
from conceptedit.comfy_host.text import ComfyText
from conceptedit.editing.uce import closed_form as cf  # noqa: E402

LLM = ("qwen_image", "z_image", "lumina2", "flux2", "hunyuan_image21")


def _own(clip, prompt):
    """The prompt's context as ComfyUI's CLIPTextEncode makes it."""
    return clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)[0]


@pytest.mark.parametrize("name", LLM)
def test_word_rows_are_where_the_contexts_first_differ(comfy, one_thread, name):
    _, clip, _ = families.built(name)
    text = ComfyText(clip)
    with torch.inference_mode():
        red, blue = _own(clip, "a red circle")[0], _own(clip, "a blue circle")[0]
        (_, ids, start, eos, causal), = text.token_segments("a red circle")
        (_, ids_b, start_b, _, _), = text.token_segments("a blue circle")
        empty, = text.token_segments("")
    assert text.context_varies and causal is True and start == start_b == empty[2]
    assert len(ids) == red.shape[0] and len(ids_b) == blue.shape[0]  # ids[i] is context row i
    # the prompt's own tokens: from `start` up to the EOS (the first template token after them)
    end = ids.index(eos, start) if eos >= 0 else len(ids)
    assert ids[:start] == empty[1][:start] and ids[end:] == empty[1][start:]
    # the word's rows: the tokens the two prompts differ in; the contexts are equal before them
    first = next(i for i, (a, b) in enumerate(zip(ids, ids_b)) if a != b)
    assert start < first < end
    assert torch.equal(red[:first], blue[:first])
    assert not torch.allclose(red[first], blue[first])
    # the closed form reads the same rows: the concept "red" has tokens, its window starts at `start`
    seg, = cf.token_segments(text, "red")
    window = cf._window(seg.ids, seg.eos_id, cf._scheme(cf.UCEConfig(concepts=["red"]), seg), seg.start)
    assert window[0] == start and window[-1] == len(seg.ids) - 1  # causal: aligned, the template after the word too


@pytest.mark.parametrize("name", LLM)
def test_batch_of_different_lengths_is_each_prompts_own_encode(comfy, one_thread, name):
    _, clip, _ = families.built(name)
    text = ComfyText(clip)
    prompts = ["a red circle", "", "a photo of a dog on a wooden chair in the sun"]
    with torch.inference_mode():
        batch = text.encode(prompts)
        own = [_own(clip, p)[0] for p in prompts]
        lengths = [o.shape[0] for o in own]
        assert len(set(lengths)) == 3
        # stacks with a batch encoded on its own ("" alone): one padded length, a multiple of 512
        assert batch.shape[1] % 512 == 0 and text.encode([""]).shape[1] == batch.shape[1]
        for row, o in zip(batch, own):
            n = o.shape[0]
            mine, pad = (row[-n:], row[:-n]) if text.pads_left else (row[:n], row[n:])
            assert torch.equal(mine, o) and not pad.any()
        assert text.pads_left == (name == "flux2")  # Mistral's tokenizer pads on the left
        # sampling's conditioning: padded to the longest only; a padded batch goes without a text mask
        (cond, extra), = text.conditioning(prompts)
        assert cond.shape[1] == max(lengths) and "attention_mask" not in extra
        # prompts of one length: the CLIP's own outputs batched, its masks included
        (same, extra), = text.conditioning(["a red circle", "a red circle"])
        given = clip.encode_from_tokens(clip.tokenize("a red circle"), return_pooled=True, return_dict=True)
        assert torch.equal(same, torch.cat([given["cond"]] * 2))
        assert set(extra) == set(given) - {"cond"}
        if "attention_mask" in given:
            assert torch.equal(extra["attention_mask"], torch.cat([given["attention_mask"]] * 2))
        # what the denoiser gets for a slice of the padded batch: the prompt's own rows, as `conditioning`
        got = text.extras_for(batch[[0, 0]])
        assert torch.equal(got["cross_attn"], torch.stack([own[0]] * 2))
        assert text.extras_for(batch[[0, 2]])["cross_attn"].shape[1] == max(lengths[0], lengths[2])
        assert text.extras_for(torch.randn_like(batch[:1])) == {}  # not a context it encoded


def _norm_fn(view, key):
    """The model's own function from the context to what projection `key` reads (its norm, if any)."""
    p = view.family.projection(key)
    return view.text_norms[p.norm] if p.norm else (lambda x: x)


@pytest.mark.parametrize("name", LLM)
def test_closed_form_moves_the_concept_rows_on_the_models_projection(comfy, one_thread, name):
    """The Cross-Attention Edit node on "red" (erase to ""): on the model's own text projection (the
    norm in front of it included), each edited row of "red" (its word and, the encoder being causal,
    the template rows after it) goes to the projection of the "" row it is aligned with, and the rows
    of preserved prompts stay. lam is small here: the tiny builds' rows are small (random norm weights,
    RMS ~0.03 hidden states) next to the default lam 0.5, which real checkpoints' rows are not."""
    from conceptedit.comfy_host.view import ModelView
    model, clip, _ = families.built(name)
    with torch.inference_mode():
        m_uce, edit = _node(comfy, "ConceptEditCrossAttentionEdit", model=model, clip=clip, concepts="red",
                            lam=1e-3)
        view = ModelView(model, clip)
        text = view.text
        keys = [k for k in view.family.projection_keys("tokens") if k in edit.changes and k.endswith(".weight")]
        assert keys and edit.metrics["edited_token_vectors"] > 0
        new = patched_weights(m_uce, keys)  # what the model computes with: ComfyUI's patch arithmetic
        seg, = cf.token_segments(text, "red")
        guide, = cf.token_segments(text, "")
        e_s, e_g = cf._eos(seg.ids, seg.eos_id, seg.start), cf._eos(guide.ids, guide.eos_id, guide.start)
        rows = torch.arange(seg.start, len(seg.ids))
        to = cf._aligned(rows, e_s, e_g, len(guide.ids), guide.start)
        kept = ["a dog", "a photo", "a city"]
        for k in keys:
            read = _norm_fn(view, k)
            W, W2 = view.weights[k].float(), new[k]
            c = read(_own(clip, "red")[0][rows].float())
            g = read(_own(clip, "")[0][to].float())
            reach = float((c @ W2.T - g @ W.T).norm() / (c @ W.T - g @ W.T).norm())
            assert reach < 0.5, (k, reach)
            for p in kept:
                x = read(_own(clip, p)[0].float())
                moved = float((x @ (W2 - W).T).norm() / (x @ W.T).norm())
                assert moved < 0.2, (k, p, moved)


def test_hidream_llama_states_reach_the_denoiser(comfy, one_thread):
    """HiDream's model reads the Llama states (`conditioning_llama3`) besides the T5 context: the
    denoiser's own path (`ComfyDenoiser.eps`) finds them for the context it is given."""
    model, clip, _ = families.built("hidream")
    text = ComfyText(clip)
    with torch.inference_mode():
        ctx, pooled = text.encode_with_pooled(["a red circle", "a blue square"])
        host = ComfyDenoiser(model, text, latent_hw=8, family=model_family(model))
        extras = text.extras_for(ctx)
        llama = [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True, return_dict=True)["conditioning_llama3"]
                 for p in ("a red circle", "a blue square")]
        assert torch.equal(extras["conditioning_llama3"], torch.cat(llama)) and "cross_attn" not in extras
        x = torch.randn(2, host.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500, 500])
        y = host.adm(pooled, 2)
        e = host.eps(x, t, ctx, y)
        swapped = host.eps(x, t, ctx[[1, 0]], y)  # the Llama states follow their context
        assert torch.isfinite(e).all() and not torch.allclose(e, swapped)
        assert torch.allclose(host.eps(x[:1], t[:1], ctx[:1], y[:1]), e[:1], atol=1e-5)


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_padded_context_reaches_the_model_as_its_own(comfy, one_thread, name):
    """A prompt's context out of a padded batch gives the prediction of its own encode."""
    model, clip, _ = families.built(name)
    text = ComfyText(clip)
    with torch.inference_mode():
        host = ComfyDenoiser(model, text, family=model_family(model), latent_hw=8)
        padded = text.encode(["a red circle", "a photo of a dog on a wooden chair in the sun"])[:1]
        own = _own(clip, "a red circle")
        assert padded.shape[1] > own.shape[1]
        shape = (1, host.latent_channels) + ((1,) if host.latent_dims == 3 else ()) + (8, 8)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([400])
        assert torch.allclose(host.eps(x, t, padded), host.eps(x, t, own), atol=1e-5)


@pytest.mark.parametrize("name", ["qwen_image", "z_image", "flux2"])
def test_a_batch_of_mixed_lengths_is_predicted_per_length_as_each_prompt_alone(comfy, one_thread, name):
    """A padded batch of prompts of different lengths: every row's prediction is that prompt's own
    (the denoiser runs each length on its own rows; these DiTs read zero rows as text), and gradients
    reach the context through the grouping."""
    model, clip, _ = families.built(name)
    text = ComfyText(clip)
    prompts = ["a red circle", "a photo of a dog on a wooden chair in the sun", "a blue square"]
    host = ComfyDenoiser(model, text, family=model_family(model), latent_hw=8)
    with torch.inference_mode():
        batch = text.encode(prompts)
        assert text.own_rows(batch) is not None and len(set(text.own_rows(batch))) >= 2
        shape = (3, host.latent_channels) + ((1,) if host.latent_dims == 3 else ()) + (8, 8)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([400, 300, 200])
        got = host.eps(x, t, batch)
        for i, p in enumerate(prompts):
            alone = host.eps(x[i:i + 1], t[i:i + 1], _own(clip, p))
            assert torch.allclose(got[i:i + 1], alone, atol=1e-5), p
    if name == "flux2":  # Flux's blocks add in place; training runs them in `training.frozen_session`
        return
    ctx = batch.clone().requires_grad_(True)
    host.eps(x.clone(), t.clone(), ctx).square().sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0

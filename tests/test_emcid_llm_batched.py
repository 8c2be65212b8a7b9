"""EMCID stage 1 with concepts whose prompts tokenize to different lengths in an LLM text encoder (kind
"llm": a chat template around the prompt), built by tests/families.py with ComfyUI's own encoder classes
and tokenizers at tiny widths (random weights).

An LLM encoder masks its padding and gives each prompt a context of its own length, so stage 1 batches
such concepts together (`stage1._width_key` leaves an LLM's width out): their ids come from one tokenizer
call, right-padded with the padding masked, each row keeping its own last-token index (`stage1._stack`).
The sampler does read the padding of a batch of prompts (the DiT takes no text mask), so the pictures
are drawn in one call per token width (`stage1.draw_pictures`).

- three concepts of three widths make one stage-1 batch; their pictures take one sampler call per
  width, each concept's pictures those it draws alone (Qwen-Image, whose DiT reads the padding);
- the mixed batch's targets equal the one-at-a-time targets (Flux.2's Mistral 3: its chat template,
  its model padding every context to 512 rows itself; Qwen-Image, whose DiT reads whatever rows it is
  given): δ within `TOL` of ‖h‖, the losses within `TOL`. On Qwen-Image this also holds the denoiser to
  reading each prompt's own rows when a batch's contexts share one length shorter than the context
  (`ComfyDenoiser._apply`; before, a one-at-a-time run read its padding: δ off by 0.07 of ‖h‖).
"""
from __future__ import annotations

import importlib.util
from contextlib import ExitStack

import pytest
import torch

if importlib.util.find_spec("comfy.ldm.qwen_image") is None:
    pytest.skip("this ComfyUI predates the 2025-26 text encoders (the 2024-03 copy): set COMFYUI_PATH to "
                "ComfyUI 0.3.75", allow_module_level=True)

import families  # noqa: E402

from conceptedit.comfy_host.denoiser import ComfyDenoiser  # noqa: E402
from conceptedit.comfy_host.text_hooks import ComfyTextModel  # noqa: E402
from conceptedit.editing.emcid import stage1  # noqa: E402
from conceptedit.editing.emcid.config import EmcidConfig  # noqa: E402
from conceptedit.editing.emcid.stage2 import concept_prompts  # noqa: E402
from conceptedit.editing.training import frozen_session  # noqa: E402

# sources of three token lengths (the destinations of two), each in two templates of one length apiece
PAIRS = [("red", "blue"), ("a bright red", "blue"), ("a very dark crimson red", "pale blue")]
TEMPLATES = ("a photo of {}", "{} on a table")
# relative to ‖h‖ (δ) and to the loss: on these random weights the text moves Flux.2's prediction by
# ~1e-5, so its ε-losses are ~1e-10 and the float32 rounding of a padded batch against an unpadded one is
# up to ~1e-3 of such a loss; it reaches δ through Adam's normalised steps (measured: 4e-6 of ‖h‖ on δ,
# 3e-4 on the losses, 1e-3 on the probes). A wrong last-token index or unmasked padding moves δ by
# about its own size (0.15-0.2 of ‖h‖)
TOL = 1e-4
LOSS_TOL = 5e-3
PICTURE_TOL = 1e-5  # pictures: the rounding of a sampler batch of another size (measured: 0 to 3e-7)


def _cfg(**kw) -> EmcidConfig:
    base = dict(steps=2, lr=0.005, weight_decay=5e-4, pooled_weight=0.01, max_norm=1.5, sample_steps=1,
                templates=TEMPLATES, seed=3)
    return EmcidConfig(**{**base, **kw})


def _hosts(name: str):
    model, clip, _ = families.built(name)
    text = ComfyTextModel(clip)
    return model, text, ComfyDenoiser(model, clip, latent_hw=8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _widths(text, concepts, templates=TEMPLATES) -> list[int]:
    enc = text.encoders[0]
    return [int(concept_prompts(text, [c], templates).ids[enc].shape[1]) for c in concepts]


def _training(model, text) -> ExitStack:
    stack = ExitStack()
    stack.enter_context(torch.enable_grad())
    for root in [model.model.diffusion_model, *text.transformers()]:
        stack.enter_context(frozen_session(root))
    return stack


def test_concepts_of_different_lengths_batch_together_and_draw_per_width(comfy, one_thread, monkeypatch):
    model, text, den = _hosts("qwen_image")
    enc = text.encoders[0]
    assert text.kinds[enc] == "llm"
    srcs = [s for s, _ in PAIRS]
    widths = _widths(text, srcs)
    assert len(set(widths)) == len(PAIRS), widths  # three widths: the batch pads two of them
    each = [concept_prompts(text, [s], TEMPLATES) for s in srcs]
    assert len({stage1._width_key(text, p) for p in each}) == 1  # so one stage-1 batch takes them all

    # one joint tokenizer call: each concept's rows are its own tokens, then the pad id, and its last-token
    # index is the one it has alone (right padding moves no token)
    ids, pos = stage1._stack(text, each, srcs, TEMPLATES, 1)
    assert ids[enc].shape == (len(srcs) * len(TEMPLATES), max(widths))
    pad = int(ids[enc][0, -1])
    for b, p in enumerate(each):
        rows = slice(b * len(TEMPLATES), (b + 1) * len(TEMPLATES))
        assert torch.equal(ids[enc][rows, :widths[b]], p.ids[enc])
        assert bool((ids[enc][rows, widths[b]:] == pad).all())
        assert torch.equal(pos[enc][rows], p.pos[enc])

    # the pictures: one sampler call per width, each concept's as it draws them alone
    calls: list[list[str]] = []
    real = den.sample

    def sample(prompts, **kw):
        calls.append(list(prompts))
        return real(prompts, **kw)

    monkeypatch.setattr(den, "sample", sample)
    cfg = _cfg()
    dev = torch.device("cpu")
    with torch.inference_mode():
        joint = stage1.draw_pictures(den, each, cfg, dev)
        alone = [stage1.draw_pictures(den, [p], cfg, dev)[0] for p in each]
        together = stage1.draw_pictures(den, [each[0], each[0]], cfg, dev)  # one width: one call
    assert calls[:len(PAIRS)] == [p.text for p in each] and len(calls) == 2 * len(PAIRS) + 1
    for x, want in zip(joint, alone):
        assert x.shape == want.shape and _rel(x, want) < PICTURE_TOL
    assert _rel(together[0], alone[0]) < PICTURE_TOL and _rel(together[1], alone[0]) < PICTURE_TOL
    # what the grouping avoids: a batch of two widths draws the shorter prompts with the longer's padding
    with torch.inference_mode():
        padded = real(each[0].text + each[2].text, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed,
                      noise_per_prompt=True)[:len(TEMPLATES)]
    assert _rel(den.latent_in(padded), alone[0]) > 1e-3

    # optimise_targets gives the three concepts to one optimise_deltas call
    batches: list[list[tuple[str, str]]] = []
    monkeypatch.setattr(stage1, "optimise_deltas",
                        lambda text_, den_, pairs, last, cfg_, *a, **kw: batches.append(list(pairs)) or
                        [({e: torch.zeros(1) for e in last}, {e: torch.zeros(1) for e in last},
                          {"probe_before": 0.0, "probe_after": 0.0}) for _ in pairs])
    stage1.optimise_targets(text, den, PAIRS, {enc: 0}, _cfg(stage1_batch=len(PAIRS)))
    assert batches == [PAIRS]


@pytest.mark.parametrize("name", [
    "flux2",
    "qwen_image",
])
def test_mixed_lengths_batched_equal_one_at_a_time(comfy, one_thread, name):
    model, text, den = _hosts(name)
    enc = text.encoders[0]
    cfg = _cfg(templates=TEMPLATES[:1])  # one picture per concept: the rows' layout is the other test's
    assert text.kinds[enc] == "llm" and len(set(_widths(text, [s for s, _ in PAIRS], cfg.templates))) == len(PAIRS)
    last = {enc: 0}
    with _training(model, text):
        single = [stage1.optimise_delta(text, den, s, d, last, cfg) for s, d in PAIRS]
        batched = stage1.optimise_deltas(text, den, PAIRS, last, cfg)
    for (db, hb, sb), (ds, hs, ss) in zip(batched, single):
        assert torch.equal(hb[enc], hs[enc])
        assert 0.01 < float(ds[enc].norm() / hs[enc].norm()) < 1.4  # moved, and not onto the clamp's ball
        assert float((db[enc] - ds[enc]).norm() / hs[enc].norm()) < TOL
        torch.testing.assert_close(torch.tensor(sb["history"]), torch.tensor(ss["history"]), rtol=LOSS_TOL, atol=0)
        for key in ("probe_before", "probe_after"):
            assert sb[key] == pytest.approx(ss[key], rel=LOSS_TOL)

"""EMCID stage 1 with several concepts in one batch (`stage1.optimise_deltas`, `optimise_targets` with
`stage1_batch`) against one concept at a time (`optimise_delta`), on the shipped tiny model and on an
SDXL-conditioned layout (the pooled term and y):

- the targets, losses and probes agree to float rounding (the batched matrix products are the only
  difference), also when concepts stop at different steps (a finished concept leaves the batch and
  its δ must not move again) and when the norm clamp is active;
- stage1_batch=1 is today's one-at-a-time code bit for bit; the automatic size on the CPU is a
  fixed cap; a batch that runs out of memory is halved and gives the same targets;
- the pictures stage 1 draws are drawn for the whole batch in one sampler call per picture index,
  and every prompt's picture is the one a batch of one draws (so a concept's pictures do not depend
  on which concepts share its batch).
"""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from conceptedit.comfy_host.denoiser import ComfyDenoiser
from conceptedit.comfy_host.text_hooks import ComfyTextModel
from conceptedit.editing.emcid import stage1
from conceptedit.editing.emcid.config import EmcidConfig
from conceptedit.editing.training import frozen_session
from helpers import random_clip, sdxl_style_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tiny = pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "tiny", "weights", "tiny_sd.safetensors")),
                                reason="tiny model weights not trained yet")

ENC = "clip_l"
LAST = {ENC: 2}
PAIRS = [("circle", "square"), ("red square", "blue square"), ("triangle", "star"), ("a green heart", "heart")]
# relative to the concept's ‖h‖ (δ, z) or to the loss itself: float32 rounding of a batch of 8-16 rows
# against 2-4, carried through a few Adam steps (measured: under 1e-6 on the tiny model). On random
# weights the ε-losses are ~1e-5 and Adam's normalised steps magnify the rounding of such small
# gradients (measured 1e-5 after one step, 1e-4 after three), hence a looser bound there
TOL = 1e-5
TOL_RANDOM = 1e-3


def _cfg(**kw):
    base = dict(steps=4, lr=0.2, weight_decay=5e-4, pooled_weight=0.01, max_norm=0.3, sample_steps=2,
                templates=("a photo of {}", "{}"), seed=3)
    return EmcidConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(comfy):
    from conceptedit.tiny.comfy_model import load_tiny
    model, clip, _ = load_tiny()
    return model, clip, ComfyTextModel(clip), ComfyDenoiser(model, clip)


def _single(model, text, den, pairs, cfg, steps=None):
    out = []
    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        for k, (src, dst) in enumerate(pairs):
            c = cfg if steps is None else replace(cfg, steps=steps[k])
            out.append(stage1.optimise_delta(text, den, src, dst, LAST, c))
    return out


def _batched(model, text, den, pairs, cfg, steps=None):
    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        return stage1.optimise_deltas(text, den, pairs, LAST, cfg, steps=steps)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _counting_sample(den, monkeypatch) -> list[int]:
    """The prompt count of every `den.sample` call from now on."""
    calls: list[int] = []
    real = den.sample

    def sample(prompts, **kw):
        calls.append(len(prompts))
        return real(prompts, **kw)

    monkeypatch.setattr(den, "sample", sample)
    return calls


def _assert_same(batched, single, last=LAST, tol=TOL):
    for (db, hb, sb), (ds, hs, ss) in zip(batched, single):
        for e in last:
            assert torch.equal(hb[e], hs[e])  # h is read per concept, as its own run reads it
            assert float(ds[e].norm()) > 0
            assert float((db[e] - ds[e]).norm() / hs[e].norm()) < tol, e
        assert len(sb["history"]) == len(ss["history"])
        torch.testing.assert_close(torch.tensor(sb["history"]), torch.tensor(ss["history"]), rtol=tol, atol=0)
        for key in ("probe_before", "probe_after"):
            assert sb[key] == pytest.approx(ss[key], rel=tol)
        assert set(sb["last_terms"]) == set(ss["last_terms"])
        for key, v in ss["last_terms"].items():
            assert sb["last_terms"][key] == pytest.approx(v, rel=tol, abs=1e-9), key
        assert sb["settings"] == ss["settings"]


@needs_tiny
def test_batched_equals_one_at_a_time_on_the_tiny_model(tiny, monkeypatch):
    model, _, text, den = tiny
    cfg = _cfg()
    calls = _counting_sample(den, monkeypatch)
    single = _single(model, text, den, PAIRS, cfg)
    assert calls == [len(cfg.templates)] * len(PAIRS)
    batched = _batched(model, text, den, PAIRS, cfg)
    assert calls[len(PAIRS):] == [len(cfg.templates) * len(PAIRS)]  # the batch's pictures in one call
    _assert_same(batched, single)
    # the clamp was active: some δ sits on its ball, as in the one-at-a-time run
    on_ball = [abs(float(d[ENC].norm()) - 0.3 * float(h[ENC].norm())) < 1e-4 * float(h[ENC].norm())
               for d, h, _ in single]
    assert any(on_ball) and not all(on_ball), [float(d[ENC].norm() / h[ENC].norm()) for d, h, _ in single]


@needs_tiny
def test_pictures_of_a_batch_are_each_prompts_own(tiny, monkeypatch):
    """The batch's pictures come from one sampler call per picture index, and each is the picture of its
    prompt drawn alone (a batch of one, with the seed of its index): the sampler's batched products
    round differently, nothing else. A batch that drew from one noise over its rows, or laid a concept's
    rows out in another order, gives other pictures."""
    from conceptedit.editing.emcid.stage2 import concept_prompts
    model, _, text, den = tiny
    cfg = _cfg(images_per_prompt=2)
    dev = next(den.unet().parameters()).device
    each = [concept_prompts(text, [src], cfg.templates) for src, _ in PAIRS]
    calls = _counting_sample(den, monkeypatch)
    with torch.inference_mode():
        batched = stage1.draw_pictures(den, each, cfg, dev)
        assert calls == [len(PAIRS) * len(cfg.templates)] * cfg.images_per_prompt
        one = stage1.draw_pictures(den, each[1:2], cfg, dev)[0]
        alone = {(prompt, j): stage1._unet_scale(den, den.sample([prompt], steps=cfg.sample_steps, cfg=cfg.sample_cfg,
                                                                 seed=stage1.picture_seed(cfg.seed, j)), dev)
                 for p in each for prompt in p.text for j in range(cfg.images_per_prompt)}
    for p, x in zip(each, batched):
        # rows as the concept's own run lays them out: picture j of every template, j-major
        want = torch.cat([alone[(prompt, j)] for j in range(cfg.images_per_prompt) for prompt in p.text])
        assert x.shape == want.shape
        assert _rel(x, want) < TOL, p.text
    assert _rel(batched[1], one) < TOL
    # every picture its own: the second picture of a prompt is not the first, nor another prompt's
    assert _rel(batched[0][0], batched[0][len(cfg.templates)]) > 0.1
    assert _rel(batched[0][0], batched[1][0]) > 0.1


class _StampSampler:
    """A sampler whose picture of a prompt is a function of (prompt, seed) alone, when asked for the noise
    of a batch of one: what a batch returns can be checked row by row."""

    def __init__(self):
        self.calls: list[list[str]] = []

    @staticmethod
    def picture(prompt: str, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, prompt)) * 7919 + seed)
        return torch.randn(1, 4, 2, 2, generator=g)

    def sample(self, prompts, *, steps, cfg, seed, noise_per_prompt=False, **_kw):
        assert noise_per_prompt
        self.calls.append(list(prompts))
        return torch.cat([self.picture(p, seed) for p in prompts])


def test_pictures_are_drawn_in_few_calls_in_each_concepts_layout(comfy):
    """`draw_pictures` over 5 concepts (2 templates, 3 pictures each) on the CPU: whole concepts in calls
    of at most `CPU_SAMPLE_PROMPTS` prompts, one set of calls per picture index with that index's seed,
    and each concept's rows as its own run lays them out (picture j of every template, j-major)."""
    from conceptedit.editing.emcid.stage2 import concept_prompts
    text = ComfyTextModel(random_clip())
    cfg = _cfg(images_per_prompt=3)
    srcs = ["circle", "red square", "triangle", "a green heart", "star"]
    each = [concept_prompts(text, [c], cfg.templates) for c in srcs]
    den = _StampSampler()
    got = stage1.draw_pictures(den, each, cfg, torch.device("cpu"))
    per_call = stage1.CPU_SAMPLE_PROMPTS // len(cfg.templates)
    assert per_call < len(srcs)  # the cap splits this batch
    sizes = [len(c) for c in den.calls]
    assert sizes == [per_call * len(cfg.templates), (len(srcs) - per_call) * len(cfg.templates)] * cfg.images_per_prompt
    seeds = [stage1.picture_seed(cfg.seed, j) for j in range(cfg.images_per_prompt)]
    assert seeds[0] == cfg.seed and len(set(seeds) | {cfg.seed + 1}) == len(seeds) + 1
    for p, x in zip(each, got):
        want = torch.cat([den.picture(prompt, seed) for seed in seeds for prompt in p.text])
        assert torch.equal(x, want), p.text
    # off the CPU (the meta device stands in for a GPU) no cap: the stage-1 batch bounds a call
    den.calls.clear()
    stage1.draw_pictures(den, each, cfg, torch.device("meta"))
    assert [len(c) for c in den.calls] == [len(srcs) * len(cfg.templates)] * cfg.images_per_prompt


@needs_tiny
def test_concepts_that_stop_at_different_steps(tiny):
    """A concept whose steps are done leaves the batch: its δ is frozen (no gradient, no Adam step,
    no clamp), the others go on; each equals its own run of that many steps."""
    model, _, text, den = tiny
    cfg = _cfg(steps=5)
    steps = [2, 5, 1, 3]
    single = _single(model, text, den, PAIRS, cfg, steps)
    batched = _batched(model, text, den, PAIRS, cfg, steps)
    assert [len(s["history"]) for _, _, s in batched] == steps
    assert [s["settings"]["steps"] for _, _, s in batched] == steps
    _assert_same(batched, single)


@needs_tiny
def test_stage1_batch_one_is_todays_code_exactly(tiny):
    model, _, text, den = tiny
    cfg = _cfg(steps=3, stage1_batch=1)
    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        Z, metrics = stage1.optimise_targets(text, den, PAIRS[:3], LAST, cfg)
    single = _single(model, text, den, PAIRS[:3], cfg)
    want = torch.stack([(h[ENC].double() + d[ENC].double()) for d, h, _ in single])
    assert torch.equal(Z[ENC], want) and metrics["stage1_batch"] == 1
    assert metrics["probe_loss_after"] == [round(s["probe_after"], 6) for _, _, s in single]
    # one pair through optimise_deltas is optimise_delta itself
    one = _batched(model, text, den, PAIRS[:1], cfg)
    assert torch.equal(one[0][0][ENC], single[0][0][ENC]) and one[0][2]["history"] == single[0][2]["history"]


@needs_tiny
def test_optimise_targets_batches_automatically_and_halves_on_out_of_memory(tiny, monkeypatch, tmp_path):
    model, _, text, den = tiny
    cfg = _cfg(steps=2)
    assert stage1.stage1_batch_size(cfg, den, 20) == stage1.CPU_BATCH  # automatic, on the CPU
    assert stage1.stage1_batch_size(_cfg(stage1_batch=3), den, 20) == 3
    assert stage1.stage1_batch_size(_cfg(stage1_batch=3, official="emcid"), den, 20) == 1
    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        one, _ = stage1.optimise_targets(text, den, PAIRS, LAST, _cfg(steps=2, stage1_batch=1))
    sizes = []
    real = stage1.optimise_deltas

    def small_memory(text_, den_, pairs, *a, **kw):
        sizes.append(len(pairs))
        if len(pairs) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(text_, den_, pairs, *a, **kw)

    monkeypatch.setattr(stage1, "optimise_deltas", small_memory)
    seen = []

    class Ctx(stage1.RunContext):
        def report(self, done, total):
            seen.append((done, total))

    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        Z, metrics = stage1.optimise_targets(text, den, PAIRS, LAST, cfg, Ctx(), cache_dir=str(tmp_path))
    assert sizes == [4, 2, 2] and metrics["stage1_batch"] == 4
    assert all(_rel(Z[ENC][i], one[ENC][i]) < TOL for i in range(len(PAIRS)))
    assert seen[-1] == (8, 8) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    # every concept cached on its own: a second call reads them all back
    monkeypatch.setattr(stage1, "optimise_deltas", None)
    Z2, m2 = stage1.optimise_targets(text, den, PAIRS, LAST, cfg, cache_dir=str(tmp_path))
    assert m2["cached"] == 4 and torch.equal(Z2[ENC], Z[ENC])


def test_batched_on_an_sdxl_conditioned_model(comfy):
    """An SDXL-conditioned UNet (ComfyUI's model_base.SDXL, one random CLIP): y from the pooled text
    per row (the target's from the destination, the prediction's from the δ-edited source) and the
    pooled term per concept."""
    clip = random_clip()
    patcher = sdxl_style_model(64)
    text, den = ComfyTextModel(clip), ComfyDenoiser(patcher, clip)
    cfg = _cfg(steps=3, max_norm=0.5)
    last = {ENC: 3}
    pairs = PAIRS[:3]
    with torch.enable_grad(), frozen_session(patcher.model.diffusion_model):
        single = [stage1.optimise_delta(text, den, s, d, last, cfg) for s, d in pairs]
        batched = stage1.optimise_deltas(text, den, pairs, last, cfg)
    assert all("pooled.clip_l" in s["last_terms"] for _, _, s in single)
    _assert_same(batched, single, last, TOL_RANDOM)


def test_node_and_cli_take_stage1_batch(comfy):
    """The batch size reaches the config from the node (optional input, 0 = automatic) and the CLI."""
    import argparse

    from conceptedit.cli import emcid as cli_emcid
    kind, opts = comfy.NODE_CLASS_MAPPINGS["ConceptEditTextEncoderEdit"].INPUT_TYPES()["optional"]["stage1_batch"]
    assert kind == "INT" and opts["default"] == 0 and opts["min"] == 0
    parser = argparse.ArgumentParser()
    cli_emcid.register(parser.add_subparsers())
    args = parser.parse_args(["emcid", "--ckpt", "tiny", "--pairs", "p.csv", "--out", "e.safetensors",
                              "--stage1-batch", "4"])
    assert args.stage1_batch == 4
    with pytest.raises(Exception, match="stage1_batch"):
        EmcidConfig(stage1_batch=-1).validate()


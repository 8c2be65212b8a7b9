"""Iterative UCE debias (the paper's closed loop): the weight-adjustment rule, the loop re-solving from
the original weights until the judge's shares are within tolerance, the tiny model debiased with its
classifier as the judge (closer to the target than the static mix), the node with the model as its
own judge (presence), and the CLIP-vision judge's pairing with the text tower."""
import hashlib
import json
import math

import pytest
import torch

from helpers import random_clip

from conceptedit.editing import arch
from conceptedit.editing.errors import Cancelled, InvalidInputError
from conceptedit.editing.hosts import RunContext
from conceptedit.editing.uce.closed_form import compute_uce
from conceptedit.editing.uce.config import DebiasConfig, UCEConfig
from conceptedit.editing.uce.debias import (adjust_weights, debias_uce, next_step_size, report_text,
                                            shares_from_scores, similarity_judge)

FAM = arch.get_family("tiny")


# ---- the rule ---------------------------------------------------------------------------------------
def test_weight_adjustment_adds_the_gap_keeps_the_sum_and_stops_within_tolerance():
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    new, done = adjust_weights(w, torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5]), 1.0, 0.05)
    torch.testing.assert_close(new, torch.tensor([0.2, 0.8], dtype=torch.float64))  # w + η (desired − share)
    assert not done and float(new.sum()) == pytest.approx(1.0)
    half, _ = adjust_weights(w, torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5]), 0.5, 0.05)
    torch.testing.assert_close(half, torch.tensor([0.35, 0.65], dtype=torch.float64))
    same, done = adjust_weights(w, torch.tensor([0.54, 0.46]), torch.tensor([0.5, 0.5]), 1.0, 0.05)
    assert done and torch.equal(same, w)  # within tolerance: this concept's weights stay
    three, _ = adjust_weights(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.0, 0.0, 1.0]),
                              torch.tensor([1 / 3, 1 / 3, 1 / 3]), 1.0, 0.05)
    assert float(three.sum()) == pytest.approx(1.0) and float(three[2]) == pytest.approx(0.5 - 2 / 3)
    clamped, _ = adjust_weights(torch.tensor([1.8, -0.8]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), 1.0,
                                0.05, bounds=(-1.0, 2.0))
    torch.testing.assert_close(clamped, torch.tensor([2.0, -1.0], dtype=torch.float64))
    # an overshoot (the gap turned around) halves η; a gap on the same side keeps it
    assert next_step_size(1.0, torch.tensor([-0.2, 0.2]), torch.tensor([0.3, -0.3])) == 0.5
    assert next_step_size(1.0, torch.tensor([0.1, -0.1]), torch.tensor([0.3, -0.3])) == 1.0
    assert next_step_size(1.0, torch.tensor([0.1, -0.1]), None) == 1.0


def test_shares_count_the_top_option_per_picture_and_bad_judges_are_refused():
    scores = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [1.0, 1.5]])
    torch.testing.assert_close(shares_from_scores(scores, 2), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(InvalidInputError, match=r"\[pictures, 3\]"):
        shares_from_scores(scores, 3)
    for bad, match in [(dict(tolerance=1.0), "tolerance"), (dict(max_iterations=-1), "max_iterations"),
                       (dict(step_size=0.0), "step_size"), (dict(samples=0), "samples"),
                       (dict(weight_min=0.6), "weight bounds"), (dict(keep="first"), "keep")]:
        with pytest.raises(InvalidInputError, match=match):
            DebiasConfig(**bad).validate()


# ---- the loop, with a simulated model and judge ---------------------------------------------------
class _Text:
    """A host Text of the tiny width: words -> ids, EOS-padded; stable random embeddings."""

    def __init__(self, d=FAM.context_dim, length=8):
        self.d, self.length = d, length
        self.calls = []

    def token_ids(self, prompt):
        ids = [1] + [10 + (sum(map(ord, w)) % 1000) for w in prompt.split()][: self.length - 2] + [2]
        return ids + [2] * (self.length - len(ids))

    def encode(self, prompts):
        self.calls.extend(prompts)
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little"))
            out.append(torch.randn(self.length, self.d, generator=g))
        return torch.stack(out)


def _weights(seed=0):
    shapes = FAM.expected_shapes()
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=g) * 0.1 for k in FAM.attn2_kv_keys()}


def _simulated(n=20):
    """A model whose share of option 0 responds steeply (and off-centre) to the weight the edit gives it:
    share = clamp(0.5 + 2 (w₀ − 0.75)); the static mix (w₀ = 0.5) then draws option 0 never."""
    seen = []

    def generate(edit, prompts, seed):
        w0 = 0.5 if edit is None else edit.params["option_weights"][prompts[0]][0]
        seen.append(edit)
        share = min(max(0.5 + 2 * (w0 - 0.75), 0.0), 1.0)
        k = round(share * len(prompts))
        return torch.tensor([[1.0, 0.0]] * k + [[0.0, 1.0]] * (len(prompts) - k))

    def judge(samples, options, concept):
        assert list(options) == ["red", "blue"] and concept == "a circle"
        return samples

    return generate, judge, seen


def test_loop_reaches_the_target_where_the_static_mix_misses_and_solves_from_the_original_weights():
    weights = _weights()
    before = {k: v.clone() for k, v in weights.items()}
    cfg = UCEConfig(concepts=["a circle"], mode="debias", guide="red:0.5, blue:0.5", default_preserve=False)
    generate, judge, seen = _simulated()
    text = _Text()
    edit = debias_uce(text, weights, FAM, cfg, DebiasConfig(samples=20, max_iterations=6), generate, judge)
    d = edit.metrics["debias"]
    assert d["original_shares"] == {"a circle": [0.0, 1.0]} and seen[0] is None  # the unedited model, measured once
    assert d["static_shares"] == {"a circle": [0.0, 1.0]} and d["static_max_gap"] == 0.5
    assert d["converged"] and d["reached_max_gap"] <= 0.05 and d["reached_shares"]["a circle"] == [0.5, 0.5]
    rounds = d["rounds"]
    # static mix -> +gap (overshoots to all red) -> η halved -> on target
    assert [r["weights"]["a circle"][0] for r in rounds] == [0.5, 1.0, 0.75]
    assert [r["shares"]["a circle"] for r in rounds] == [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]
    assert d["chosen_iteration"] == 2 and len(seen) == 1 + len(rounds)
    # the chosen edit is the closed form from the ORIGINAL weights at the round's weights (not cumulative)
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    direct = compute_uce(_Text(), before, FAM, cfg, option_weights={"a circle": [0.75, 0.25]})
    for k, c in direct.changes.items():
        torch.testing.assert_close(edit.changes[k].delta(dtype=torch.float64), c.delta(dtype=torch.float64))
    static = compute_uce(_Text(), before, FAM, cfg)
    k0 = FAM.attn2_kv_keys()[0]
    assert not torch.allclose(edit.changes[k0].delta(), static.changes[k0].delta())
    assert len(set(text.calls)) == len(text.calls)  # every prompt encoded once over all rounds
    json.dumps(edit.metrics), json.dumps(edit.params)  # the record goes into the edit file's header
    assert "round 2" in report_text(edit) and "within tolerance" in report_text(edit)

    # the official fixed η swings between all-blue and all-red on this response and never settles
    fixed = debias_uce(_Text(), weights, FAM, cfg, DebiasConfig(samples=20, max_iterations=4, halve_on_overshoot=False,
                                                                 measure_original=False), *_simulated()[:2])
    assert not fixed.metrics["debias"]["converged"] and fixed.metrics["debias"]["original_shares"] is None
    assert [r["shares"]["a circle"][0] for r in fixed.metrics["debias"]["rounds"]] == [0.0, 1.0, 0.0, 1.0, 0.0]
    # max_iterations 0 is the static mix alone, measured
    only = debias_uce(_Text(), weights, FAM, cfg, DebiasConfig(samples=20, max_iterations=0), *_simulated()[:2])
    assert len(only.metrics["debias"]["rounds"]) == 1


def test_loop_cancels_and_refuses_other_modes():
    cfg = UCEConfig(concepts=["a circle"], mode="debias", guide="red:0.5, blue:0.5", default_preserve=False)
    calls = []
    ctx = RunContext(should_stop=lambda: (calls.append(1), len(calls) > 3)[1])
    with pytest.raises(Cancelled):
        debias_uce(_Text(), _weights(), FAM, cfg, DebiasConfig(samples=4, max_iterations=20), *_simulated()[:2], ctx)
    with pytest.raises(InvalidInputError, match="mode 'debias'"):
        debias_uce(_Text(), _weights(), FAM, UCEConfig(concepts=["x"]), DebiasConfig(), *_simulated()[:2])
    with pytest.raises(InvalidInputError, match="2 finite option weights"):
        compute_uce(_Text(), _weights(), FAM, cfg, option_weights={"a circle": [1.0]})


# ---- the tiny model, its classifier as the judge --------------------------------------------------
def _colour_judge():
    from conceptedit.tiny.classifier import LABELS, load_classifier
    clf, colours = load_classifier(), list(LABELS["colour"])

    def judge(latents, options, concept):  # tiny latents are the picture's RGB in [-1, 1]
        with torch.no_grad():
            logits = clf(latents[:, :3].float().clamp(-1, 1))["colour"]
        return logits[:, [colours.index(o) for o in options]]

    return judge


# few pictures and steps keep this within seconds on a CPU; the colour is settled after 4 Euler steps
TINY_LOOP = dict(samples=8, steps=4, cfg=5.0, max_iterations=2, tolerance=0.07, measure_original=False)


def test_tiny_model_debiased_by_the_loop_closer_than_the_static_mix(comfy):
    from conceptedit.comfy_host import jobs
    from conceptedit.tiny.comfy_model import load_tiny

    model, clip, _ = load_tiny()
    cfg = UCEConfig(concepts=["a circle"], mode="debias", guide="red:0.5, blue:0.5", default_preserve=False)
    out = jobs.run("uce", model, clip, jobs.UCEJob(settings=cfg, loop=DebiasConfig(**TINY_LOOP), judge=_colour_judge()),
                          RunContext())
    print(report_text(out.edit))
    d = out.edit.metrics["debias"]
    rounds = d["rounds"]
    assert rounds[0]["weights"]["a circle"] == [0.5, 0.5] and all(len(r["shares"]["a circle"]) == 2 for r in rounds)
    assert d["converged"] or d["reached_max_gap"] < d["static_max_gap"]
    assert d["reached_max_gap"] < d["static_max_gap"]  # the static mix misses on this model (see README numbers)
    assert out.model is not model and not model.patches and out.edit.method == "uce"
    assert math.isclose(sum(d["reached_shares"]["a circle"]), 1.0)


# ---- the node: the model as its own judge (presence, no VAE) ---------------------------------------
def test_node_runs_with_the_model_as_judge_and_leaves_input_unchanged(comfy):
    from conceptedit.tiny.comfy_model import load_tiny

    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditUCEDebias"]()
    model, clip, _ = load_tiny()
    before = {k: v.clone() for k, v in model.model_state_dict().items()}
    with torch.inference_mode():
        # the static mix only, 2 pictures of 2 steps at 128 px (16 × 16 latents): the plumbing, in seconds
        res = node.execute(model, clip, "a circle", "red:0.5, blue:0.5", 0.05, 0, 2, 2, 5.0, 0,
                           default_preserve=False, width=128, height=128)
    out_model, edit, text = res.result
    assert out_model is not model and not model.patches
    assert all(torch.equal(v, before[k]) for k, v in model.model_state_dict().items())
    d = edit.metrics["debias"]
    assert len(d["rounds"]) == 1 and d["original_shares"] and "unedited" in text and "round 0" in text
    assert all(math.isclose(sum(r["shares"]["a circle"]), 1.0) for r in d["rounds"])


def test_cli_runs_the_loop_and_writes_the_rounds(comfy, tmp_path):
    from conceptedit import cli
    from conceptedit.editing.edit import Edit
    concepts = tmp_path / "c.txt"
    concepts.write_text("a circle\n")
    out = tmp_path / "debias.safetensors"
    with torch.inference_mode():
        assert cli.main(["uce", "--ckpt", "tiny", "--concepts", str(concepts), "--mode", "debias", "--guide",
                         "red:0.5, blue:0.5", "--no-default-preserve", "--loop", "--max-iterations", "1",
                         "--samples", "2", "--sample-steps", "2", "--tolerance", "0.01", "--out", str(out)]) == 0
    d = Edit.load(out).metrics["debias"]
    assert d["options"] == ["red", "blue"] and d["original_shares"] and 1 <= len(d["rounds"]) <= 2
    with pytest.raises(InvalidInputError, match="--mode debias"):
        cli.main(["uce", "--ckpt", "tiny", "--concepts", str(concepts), "--loop", "--out", str(out)])


# ---- the CLIP vision judge ---------------------------------------------------------------------------
def _clip_vision(tmp_path, width):
    """A real ComfyUI ClipVisionModel, tiny config (2 layers: encode_image reads the penultimate), random weights."""
    import comfy.clip_vision
    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
           "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
           "num_hidden_layers": 2, "patch_size": 32, "projection_dim": width, "torch_dtype": "float32"}
    path = tmp_path / "clip_vision_tiny.json"
    path.write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in cv.model.named_parameters():
            if "norm" in name:  # layer_norm1/2, pre_layrnorm, post_layernorm: identity
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return cv


def test_clip_vision_judge_needs_a_paired_text_tower_and_scores_by_cosine(comfy, tmp_path):
    from conceptedit.comfy_host import clip_judge, jobs
    from conceptedit.comfy_host.view import ModelView
    from conceptedit.tiny.comfy_model import load_tiny

    model, clip, vae = load_tiny()
    cv = _clip_vision(tmp_path, FAM.context_dim)
    cfg = UCEConfig(concepts=["a circle"], mode="debias", guide="red:0.5, blue:0.5")
    loop = DebiasConfig(samples=2, steps=2, max_iterations=0)
    # the tiny CLIP, like SD1.x in ComfyUI, has only the identity stand-in for a text projection
    with pytest.raises(InvalidInputError, match="no CLIP text projection"):
        jobs.run("uce", model, clip, jobs.UCEJob(settings=cfg, loop=loop, judge=cv, vae=vae), RunContext())
    with pytest.raises(InvalidInputError, match="connect the checkpoint's VAE"):
        jobs.run("uce", model, clip, jobs.UCEJob(settings=cfg, loop=loop, judge=cv), RunContext())
    paired = random_clip(3)  # a text tower with a real projection, as SDXL's CLIP-G has
    proj = [m for n, m in paired.cond_stage_model.named_modules() if n.endswith("text_projection")][0]
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    view = ModelView(model, paired, ctx=RunContext())
    judge = view.picture_judge(cv, vae, jobs.UCEJob(settings=cfg).judge_template)
    latents = torch.rand(3, 4, 32, 32) * 2 - 1
    scores = judge(latents, ["red", "blue"], "a circle")
    with torch.no_grad():
        img = cv.encode_image(vae.decode(latents)).image_embeds
        txt = clip_judge.paired_text_embeddings(paired)(["This is a photo of red.", "This is a photo of blue."])
    want = torch.nn.functional.normalize(img.float(), dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    assert scores.shape == (3, 2) and float((want[:, 0] - want[:, 1]).abs().max()) > 0
    torch.testing.assert_close(scores, want)
    with pytest.raises(InvalidInputError, match="not in one space"):
        similarity_judge(lambda s: torch.ones(2, 5), lambda p: torch.ones(len(p), 4))(None, ["a", "b"], "c")


# ---- the README's numbers (slow tier) -----------------------------------------------------------------
@pytest.mark.slow
def test_tiny_debias_numbers(comfy):
    """"a circle" to red:blue 50:50 on the tiny model, 16 pictures of 8 steps per round: the classifier as
    the judge, then the model itself (presence) as the judge, each edit read by the classifier."""
    from conceptedit.comfy_host import jobs
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    from conceptedit.tiny.comfy_model import load_tiny

    model, clip, _ = load_tiny()
    cfg = UCEConfig(concepts=["a circle"], mode="debias", guide="red:0.5, blue:0.5")
    loop = DebiasConfig(samples=16, steps=8, cfg=5.0, max_iterations=6, tolerance=0.05)
    classify = _colour_judge()
    results = {}
    for name, judge in (("classifier", classify), ("presence", None)):
        out = jobs.run("uce", model, clip, jobs.UCEJob(settings=cfg, loop=loop, judge=judge), RunContext())
        lat = ComfyDenoiser(out.model, clip).sample(["a circle"] * 16, steps=8, cfg=5.0, seed=0)
        read = shares_from_scores(classify(lat, ["red", "blue"], "a circle"), 2).tolist()
        results[name] = (out.edit.metrics["debias"], read)
        print(f"judge: {name}\n{report_text(out.edit)}\nclassifier reads the chosen edit as red={read[0]:.2f} "
              f"blue={read[1]:.2f}")
    d, read = results["classifier"]
    assert d["reached_max_gap"] < d["static_max_gap"] and read == d["reached_shares"]["a circle"]

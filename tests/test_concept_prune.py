"""ConceptPrune: the math on hand-made cases, the statistics against a brute-force reference, the
real SD1/SD2/SDXL layouts, Cancel, and the node in real ComfyUI."""
import os

import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.concept_prune.prune import (FFNStatistics, collect_statistics, compute_concept_prune,
                                                     ffn_layers, floor_edit, skilled_mask, wanda_scores,
                                                     with_preset_defaults)
from conceptedit.editing.concept_prune.config import PruneConfig
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import (Cancelled, FingerprintMismatchError, InvalidInputError,
                                        UnknownArchitectureError)
from conceptedit.editing.hooks import trace_inputs
from conceptedit.editing.hosts import RunContext
from conceptedit.editing.prompts import PRESETS, build_pairs, defaults, parse_pairs

from helpers import random_model, random_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = "a {concept} in a park | a park\na red {concept} | a red thing\n"
FIVE_PAIRS = PAIRS + "a blue {concept} | a blue thing\na {concept} at night | a night\na big {concept} | a big thing\n"


# ---- the math ------------------------------------------------------------------------------------
def test_concept_only_neuron_is_selected_shared_one_is_not():
    w = torch.ones(3, 8)
    cn = torch.zeros(1, 8)
    rn = torch.zeros(1, 8)
    cn[0, 0], rn[0, 0] = 1.0, 0.0      # fires only for the concept
    cn[0, 1], rn[0, 1] = 2.0, 2.0      # fires (more) for both
    cn[0, 2:], rn[0, 2:] = 0.1, 0.1    # background
    m = skilled_mask(w, cn, rn, skill_ratio=0.25, tau=1)  # k = 2 per row: columns 0 and 1
    assert m[:, 0].all()
    assert not m[:, 1].any()
    assert m.sum() == 3


def test_topk_is_per_row_and_uses_weight_magnitude():
    # neuron 0 fires only for the concept, but row 1 barely uses it: in row 1 another concept
    # neuron with a big weight wins the single slot.
    w = torch.full((2, 4), 0.1)
    w[0, 0], w[1, 0], w[1, 2] = 1.0, 0.001, 1.0
    cn = torch.tensor([[1.0, 0.2, 0.5, 0.2]])
    rn = torch.tensor([[0.0, 0.2, 0.0, 0.2]])
    m = skilled_mask(w, cn, rn, skill_ratio=0.25, tau=1)
    assert m.tolist() == [[True, False, False, False], [False, False, True, False]]
    assert torch.equal(wanda_scores(w, cn[0]), w.abs() * cn[0])


def test_union_over_the_first_tau_steps_only():
    w = torch.ones(1, 4)
    cn = torch.full((6, 4), 0.5)
    rn = torch.full((6, 4), 0.5)
    cn[1, 1] = 1.0  # skilled at step 1
    cn[4, 2] = 1.0  # skilled at step 4
    assert skilled_mask(w, cn, rn, 0.25, tau=3)[0].tolist() == [False, True, False, False]
    assert skilled_mask(w, cn, rn, 0.25, tau=5)[0].tolist() == [False, True, True, False]


def test_k_per_row_is_the_floor_of_ratio_times_width():
    # the official rule int(skill_ratio · 4d): 0.01 · 1280 = 12.8 gives 12 (rounding gave 13); at least 1
    for n, ratio, k in ((1280, 0.01, 12), (10, 0.29, 2), (128, 0.2, 25), (256, 0.2, 51), (10, 0.001, 1)):
        w = torch.ones(2, n)
        cn = torch.linspace(2.0, 1.0, n)[None]  # distinct scores, every column favours the concept
        m = skilled_mask(w, cn, torch.zeros(1, n), ratio, tau=1)
        assert m.sum(1).tolist() == [k, k], (n, ratio)
        assert m[:, :k].all()


def test_zero_skill_ratio_and_tau_mean_the_presets_defaults():
    for preset, ratio, tau in (("artist", 0.01, 10), ("nudity", 0.01, 9), ("object", 0.02, 10), ("tiny", 0.2, 10),
                               ("custom", 0.02, 10)):
        c = with_preset_defaults(PruneConfig(skill_ratio=0.0, tau=0, steps=50), preset)
        assert (c.skill_ratio, c.tau) == (ratio, tau) == (defaults(preset)["skill_ratio"], defaults(preset)["tau"])
    assert with_preset_defaults(PruneConfig(skill_ratio=0.0, tau=0, steps=4), "nudity").tau == 4  # at most steps
    c = with_preset_defaults(PruneConfig(skill_ratio=0.3, tau=2, steps=4), "tiny")
    assert (c.skill_ratio, c.tau) == (0.3, 2)  # values the user set are kept


def test_floor_edit_prunes_every_weight_of_the_same_layers():
    a, b = "diffusion_model.a.ff.net.2.weight", "diffusion_model.b.ff.net.2.weight"
    edit = Edit(method="concept_prune", family="tiny", concepts=["circle"], fingerprint={"unet": "abc"},
                changes={a: Change("mask", (3, 8), {"index": torch.tensor([1, 5], dtype=torch.int32)}),
                         b: Change("mask", (2, 4), {"index": torch.tensor([], dtype=torch.int32)})})
    floor = floor_edit(edit)
    assert set(floor.changes) == set(edit.changes) and floor.fingerprint == edit.fingerprint
    w = torch.randn(3, 8)
    assert torch.equal(floor.changes[a].delta(w, dtype=torch.float32, device="cpu"), -w)
    assert floor.changes[b].tensors["index"].tolist() == list(range(8))
    with pytest.raises(InvalidInputError, match="ConceptPrune"):
        floor_edit(Edit(method="uce", family="tiny", changes={}))


def test_floor_edit_keeps_the_columns_that_are_not_mlp_neurons():
    """A Flux single block's linear2 reads [attention | MLP]: the floor zeroes the MLP part only."""
    key = "diffusion_model.single_blocks.0.linear2.weight"
    edit = Edit(method="concept_prune", family="tiny-flux", concepts=["red"],
                changes={key: Change("mask", (3, 10), {"index": torch.tensor([7], dtype=torch.int32)})})
    floor = floor_edit(edit, {"single_blocks.0.linear2": (4, 6)})
    w = torch.randn(3, 10)
    delta = floor.changes[key].delta(w, dtype=torch.float32, device="cpu")
    assert torch.equal(delta[:, :4], torch.zeros(3, 4)) and torch.equal(delta[:, 4:], -w[:, 4:])


def test_sdxl_width_mask_matches_a_row_by_row_reference():
    # a real SDXL ff.net.2 (1280 x 5120) with random weights and statistics; check a few rows
    # against a sort-based reference, and that no row exceeds k per step.
    g = torch.Generator().manual_seed(0)
    d, n, tau, ratio = 1280, 5120, 3, 0.01
    assert (d, n) in {s for k, s in arch.get_family("sdxl").expected_shapes().items() if k.endswith("ff.net.2.weight")}
    w = torch.randn(d, n, generator=g)
    cn = torch.rand(tau, n, generator=g)
    rn = torch.rand(tau, n, generator=g)
    m = skilled_mask(w, cn, rn, ratio, tau)
    k = int(ratio * n)  # the floor, as the official code
    assert (m.sum(1) <= k * tau).all() and m.any()
    for i in (0, 17, 1279):
        ref = torch.zeros(n, dtype=torch.bool)
        for t in range(tau):
            sc, sr = w[i].abs() * cn[t], w[i].abs() * rn[t]
            order = torch.argsort(sc, descending=True)[:k]
            ref[order[sc[order] > sr[order]]] = True
        assert torch.equal(m[i], ref)


def test_statistics_running_sums_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    st = FFNStatistics(["a", "b"], steps=3)
    seen = {("a", t): [] for t in range(3)} | {("b", t): [] for t in range(3)}
    for t in range(3):
        st.step = t
        for name, shape in (("a", (2, 5, 8)), ("b", (4, 3, 12)), ("a", (1, 5, 8))):
            x = torch.randn(shape, generator=g)
            st.update(name, x)
            seen[(name, t)].append(x.reshape(-1, shape[-1]))
    norms = st.norms()
    for (name, t), xs in seen.items():
        x = torch.cat(xs)
        x = x / x.norm(dim=1, keepdim=True)
        torch.testing.assert_close(norms[name][t], x.norm(dim=0) / x.shape[0] ** 0.5)
    assert st.nbytes() == 3 * (8 + 12) * 4


# ---- prompt sets ---------------------------------------------------------------------------------
def test_presets_and_custom_pairs():
    assert [len(PRESETS[p].items) for p in ("artist", "nudity", "object")] == [20, 18, 12]
    p = build_pairs(["van gogh"], "artist")["van gogh"]
    assert p[0] == ("a dog in the style of van gogh", "a photo of a dog")
    p = build_pairs(["apple", "car"], "custom", PAIRS)
    assert p["car"] == [("a car in a park", "a park"), ("a red car", "a red thing")]
    assert len(build_pairs(["apple"], "object", PAIRS)["apple"]) == 14
    for bad in ([], [" "]):
        with pytest.raises(InvalidInputError, match="at least one concept"):
            build_pairs(bad, "artist")
    with pytest.raises(InvalidInputError, match="choose one of"):
        build_pairs(["x"], "nope")
    with pytest.raises(InvalidInputError, match="'concept prompt | reference prompt'"):
        parse_pairs("no bar here")
    with pytest.raises(InvalidInputError, match="custom"):
        build_pairs(["x"], "custom", "")


def test_tiny_world_preset():
    pytest.importorskip("conceptedit.tiny.world")
    shape = build_pairs(["circle"], "tiny")["circle"]
    assert ("a red circle in the style of monet", "a red shape in the style of monet") in shape
    assert all("circle" not in r for _, r in shape) and all("circle" in c for c, _ in shape)
    style = build_pairs(["monet"], "tiny")["monet"]
    assert all("monet" in c and "monet" not in r for c, r in style)
    colour = build_pairs(["red"], "tiny")["red"]
    assert all(c.replace("red ", "") == r for c, r in colour)
    with pytest.raises(InvalidInputError, match="unknown concept"):
        build_pairs(["dragon"], "tiny")


# ---- families and safety -------------------------------------------------------------------------
@pytest.mark.parametrize("name,n_layers,widths", [("sd1", 16, {1280, 2560, 5120}), ("sd2", 16, {1280, 2560, 5120}),
                                                  ("sdxl", 70, {2560, 5120})])
def test_ffn_layers_on_real_layouts(comfy, name, n_layers, widths):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    fam = arch.get_family(name)
    unet = UNetModel(**fam.unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    layers = ffn_layers(fam, dict(unet.named_modules()))
    assert len(layers) == n_layers and {m.weight.shape[1] for m in layers.values()} == widths
    assert [f"diffusion_model.{n}.weight" for n in layers] == fam.ffn_out_keys()
    other = arch.get_family("sd1" if name == "sdxl" else "sdxl")
    with pytest.raises(InvalidInputError, match=other.label):
        ffn_layers(other, dict(unet.named_modules()))


def test_sdxl_mask_is_refused_on_an_sd15_layout():
    xl, sd1 = arch.get_family("sdxl"), arch.get_family("sd1")
    edit = Edit("concept_prune", "sdxl", {k: Change("mask", xl.expected_shapes()[k],
                                                    {"index": torch.tensor([1, 2], dtype=torch.int32)})
                                          for k in xl.ffn_out_keys()})
    shapes = {k: s for k, s in sd1.expected_shapes().items()}
    with pytest.raises(FingerprintMismatchError, match="computed for SDXL; the model is SD1.x"):
        edit.validate_for("sd1", shapes)
    # the same mask under the wrong family name is still refused on shapes/keys
    edit.family = "sd1"
    with pytest.raises(FingerprintMismatchError, match="input_blocks.4.1.transformer_blocks.1.*does not have"):
        edit.validate_for("sd1", shapes)


def test_a_model_without_cross_attention_is_a_clear_error(comfy):
    """Any layout with attn2 blocks is read from the model (tests/test_layout_matrix.py); one without
    them (a UNet with no transformer blocks, like SD3/Flux for this pack) is refused by name."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base

    class Config(comfy.supported_models_base.BASE):
        unet_config = dict(arch.TINY_UNET, transformer_depth=[0, 0], transformer_depth_middle=-1,
                           transformer_depth_output=[0, 0, 0, 0, 0])
        unet_extra_config = {}

    m = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(Config(dict(Config.unet_config)), device="cpu"),
                                         load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    from conceptedit.comfy_host.jobs import ConceptPruneJob, run
    with pytest.raises(UnknownArchitectureError, match="no transformer block with a cross-attention attn2"):
        run("concept_prune", m, None, ConceptPruneJob(concepts=["x"], preset="custom", pairs_text=PAIRS,
                                                      settings=PruneConfig(steps=2, tau=1)))


# ---- on a real ComfyUI model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(comfy):
    return random_clip()


def _denoiser(model, clip, ctx=None, latent_hw=8):
    """8x8 latents keep the random-model runs fast; None = the family's default size."""
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    return ComfyDenoiser(model, clip, latent_hw=latent_hw, ctx=ctx)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def test_statistics_from_a_real_run_equal_stored_activations(comfy, clip):
    model = random_model()
    den = _denoiser(model, clip)
    fam = arch.get_family("tiny")
    names = fam.ffn_out_modules()
    cfg = PruneConfig(steps=3, tau=2, cfg=3.0, batch_size=2, full_trajectory=True)
    prompts = ["a red circle", "a blue square", "a star"]
    with torch.inference_mode():
        st = collect_statistics(den, den.modules(), names, prompts, cfg, RunContext())
        # brute force: store every activation with its step, then reduce (the calibration starts
        # every prompt from the same noise, so the reference does too)
        stored, cur = [], [0]
        with trace_inputs(den.modules(), names, lambda n, x: stored.append((n, cur[0], x.detach().clone()))):
            for b in range(0, len(prompts), 2):
                den.sample(prompts[b:b + 2], steps=3, cfg=3.0, seed=0, on_step=lambda i: cur.__setitem__(0, i),
                           noise_per_prompt=True)
    norms = st.norms()
    assert {n for n, _, _ in stored} == set(names)
    for name in names:
        for t in range(3):
            xs = [x.reshape(-1, x.shape[-1]) for n, s, x in stored if n == name and s == t]
            x = torch.cat(xs).float()
            assert x.shape[0] == st.rows[name][t] and x.shape[0] % (2 * len(prompts)) == 0  # both CFG halves
            x = x / x.norm(dim=1, keepdim=True)
            torch.testing.assert_close(norms[name][t], x.norm(dim=0) / x.shape[0] ** 0.5, rtol=1e-4, atol=1e-6)


def test_noise_per_prompt_is_the_noise_of_a_batch_of_one(comfy, clip):
    den = _denoiser(random_model(), clip)
    prompts = ["a red circle", "a blue square", "a red circle"]
    with torch.inference_mode():
        alone = [den.sample([p], steps=2, cfg=3.0, seed=5) for p in prompts]
        together = den.sample(prompts, steps=2, cfg=3.0, seed=5, noise_per_prompt=True)
        diverse = den.sample(prompts, steps=2, cfg=3.0, seed=5)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], alone[i], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(diverse[:1], alone[0], rtol=1e-4, atol=1e-5)  # slot 0 is the same draw
    assert not torch.allclose(diverse[0], diverse[2], atol=1e-3)  # by default each slot its own noise


def test_mask_does_not_depend_on_the_batch_size(comfy, clip):
    """The node (batch 4) and the CLI (batch 8) must give the same mask: every calibration prompt starts
    from the seed's own noise, whatever its slot in a batch."""
    model = random_model()
    fam = arch.get_family("tiny")
    pairs = build_pairs(["circle"], "custom", FIVE_PAIRS)
    masks = {}
    with torch.inference_mode():
        for bs in (1, 2, 4):
            e = compute_concept_prune(_denoiser(model, clip), fam, pairs,
                                      PruneConfig(skill_ratio=0.05, steps=3, tau=2, batch_size=bs))
            masks[bs] = {k: c.tensors["index"] for k, c in e.changes.items()}
    assert sum(i.numel() for i in masks[1].values()) > 0
    for bs in (2, 4):
        assert set(masks[bs]) == set(masks[1])
        for k in masks[1]:
            assert torch.equal(masks[bs][k], masks[1][k]), (bs, k)


def test_early_stop_gives_the_same_mask_as_full_generations(comfy, clip):
    model = random_model()
    fam = arch.get_family("tiny")
    pairs = build_pairs(["circle"], "custom", PAIRS)
    progress = []
    ctx = RunContext(progress=lambda d, t: progress.append((d, t)))
    with torch.inference_mode():
        a = compute_concept_prune(_denoiser(model, clip), fam, pairs, PruneConfig(skill_ratio=0.05, steps=4, tau=2), ctx)
        b = compute_concept_prune(_denoiser(model, clip), fam, pairs,
                                  PruneConfig(skill_ratio=0.05, steps=4, tau=2, full_trajectory=True))
    assert set(a.changes) == set(fam.ffn_out_keys())
    assert sum(c.tensors["index"].numel() for c in a.changes.values()) > 0
    for k in a.changes:
        assert torch.equal(a.changes[k].tensors["index"], b.changes[k].tensors["index"])
    assert a.metrics["generations"] == 4 and 0 < a.metrics["pruned_fraction_ffn"] < 0.05 * 2
    done = [d for d, _ in progress]
    assert done == sorted(done) and progress[-1] == (4, 4) and {t for _, t in progress} == {4}  # 2 sets x τ steps


def test_cancel_mid_run_leaves_nothing(comfy, clip):
    model = random_model()
    before = _snapshot(model)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 5

    progress = []
    ctx = RunContext(progress=lambda d, t: progress.append((d, t)), should_stop=should_stop)
    den = _denoiser(model, clip, ctx)
    with torch.inference_mode(), pytest.raises(Cancelled):
        compute_concept_prune(den, arch.get_family("tiny"), build_pairs(["circle"], "custom", PAIRS),
                              PruneConfig(steps=6, tau=6), ctx)
    assert progress and progress[-1][0] < progress[-1][1]  # it really stopped mid-way
    for name, mod in model.model.diffusion_model.named_modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks, name
    assert not model.patches
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_node_in_comfyui_patches_only_masked_weights(comfy, clip):
    assert "ConceptEditConceptPrune" in comfy.NODE_CLASS_MAPPINGS
    node_cls = comfy.NODE_CLASS_MAPPINGS["ConceptEditConceptPrune"]
    inputs = node_cls.INPUT_TYPES()
    for group in inputs.values():
        for name, spec in group.items():
            assert spec[1].get("tooltip"), name
    model = random_model()
    before = _snapshot(model)
    with torch.inference_mode():
        patched, edit, info = node_cls().execute(model, clip, "circle", "custom", 0.05, 1, 2, 3.0, 0, pairs=PAIRS)
    assert "circle" in info and edit.method == "concept_prune" and edit.concepts == ["circle"]
    assert edit.params["tau"] == 1 and edit.params["skill_ratio"] == 0.05 and edit.fingerprint["family"] == "tiny"
    assert patched is not model and not model.patches
    import comfy.model_management as mm
    mm.load_models_gpu([patched])  # as ComfyUI loads a model for sampling (patches merged here)
    loaded = _snapshot(patched)
    n_masked = 0
    for k, w0 in before.items():
        key = "diffusion_model." + k
        if key in edit.changes:
            m = edit.changes[key].mask()
            n_masked += int(m.sum())
            assert (loaded[k][m] == 0).all() and torch.equal(loaded[k][~m], w0[~m])
        else:
            assert torch.equal(loaded[k], w0), k
    assert n_masked > 0
    mm.load_models_gpu([model])  # the input, loaded again, is the original
    assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())

    from conceptedit.comfy_host.view import apply_edit
    zero, _, _ = apply_edit(model, None, edit, 0.0)
    zero.patch_model()
    try:
        assert all(torch.equal(before[k], v) for k, v in _snapshot(zero).items())
    finally:
        zero.unpatch_model()


def test_node_skill_ratio_and_tau_0_use_the_presets_defaults(comfy, clip):
    node_cls = comfy.NODE_CLASS_MAPPINGS["ConceptEditConceptPrune"]
    req = node_cls.INPUT_TYPES()["required"]
    for name in ("skill_ratio", "tau"):
        assert req[name][1]["default"] == 0 and req[name][1]["min"] == 0
        assert "0 = the preset's default" in req[name][1]["tooltip"]
    assert "nudity 9" in req["tau"][1]["tooltip"] and "object 0.02" in req["skill_ratio"][1]["tooltip"]
    with torch.inference_mode():
        _, edit, _ = node_cls().execute(random_model(), clip, "naked", "nudity", 0.0, 0, 10, 3.0, 0,
                                        width=64, height=64)
    assert edit.params["skill_ratio"] == 0.01 and edit.params["tau"] == 9  # the nudity preset's (paper) values
    with torch.inference_mode():
        _, edit, _ = node_cls().execute(random_model(), clip, "circle", "custom", 0.0, 0, 2, 3.0, 0, pairs=PAIRS,
                                        width=64, height=64)
    assert edit.params["skill_ratio"] == 0.02 and edit.params["tau"] == 2  # custom: the object values, τ ≤ steps


def test_cli_writes_an_edit_file(comfy, clip, tmp_path, monkeypatch):
    from conceptedit.cli import common, main
    monkeypatch.setattr(common, "load_model", lambda ckpt, cpu=False: (random_model(), clip))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(PAIRS)
    out = tmp_path / "circle.safetensors"
    with torch.inference_mode():
        rc = main(["prune", "--ckpt", "tiny", "--concept", "circle", "--pairs", str(pairs), "--steps", "2",
                   "--tau", "1", "--skill-ratio", "0.05", "--out", str(out)])
    assert rc == 0
    e = Edit.load(out)
    assert e.method == "concept_prune" and e.concepts == ["circle"] and e.params["steps"] == 2
    assert sum(c.tensors["index"].numel() for c in e.changes.values()) == e.metrics["pruned_weights"] > 0
    # without --skill-ratio/--tau (0): the preset's values (custom pairs: the object preset's), as in the node
    with torch.inference_mode():
        assert main(["prune", "--ckpt", "tiny", "--concept", "circle", "--pairs", str(pairs), "--steps", "2",
                     "--out", str(out)]) == 0
    e = Edit.load(out)
    assert e.params["skill_ratio"] == 0.02 and e.params["tau"] == 2


TINY_WEIGHTS = os.path.join(ROOT, "tiny", "weights", "tiny_sd.safetensors")
needs_tiny = pytest.mark.skipif(not os.path.isfile(TINY_WEIGHTS), reason="tiny model weights not trained yet")


@needs_tiny
def test_node_on_the_tiny_model_with_its_clip(comfy):
    from conceptedit.tiny.comfy_model import load_tiny
    model, tiny_clip, _ = load_tiny()
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditConceptPrune"]()
    with torch.inference_mode():
        patched, edit, _ = node.execute(model, tiny_clip, "circle", "tiny", 0.05, 1, 2, 5.0, 0, batch_size=20)
    assert edit.metrics["generations"] == 40 and edit.metrics["pruned_weights"] > 0
    assert patched is not model and not model.patches and len(patched.patches) == len(edit.changes)


@pytest.fixture(scope="module")
def tiny_triangle_prune(comfy):
    """The shipped tiny model, ConceptPrune's mask for 'triangle' at the tiny defaults, and a sampler maker."""
    from conceptedit.editing.prompts import TINY_DEFAULTS
    from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny
    model, tiny_clip, _ = load_tiny()
    cfg = PruneConfig(steps=20, cfg=5.0, **TINY_DEFAULTS)
    with torch.inference_mode():
        edit = compute_concept_prune(_denoiser(model, tiny_clip, latent_hw=None), arch.get_family("tiny"),
                                     build_pairs(["triangle"], "tiny"), cfg)
    return model, tiny_clip, edit, lambda m: comfy_sampler(m, tiny_clip)


def _presence(sample, concept, n_prompts=4, samples=2):
    from conceptedit.editing.audit.evaluate import evaluate
    from conceptedit.tiny import world
    with torch.inference_mode():
        return evaluate(sample, world.prompts_for(concept, n_prompts), samples).presence.get(concept, 0.0)


@pytest.mark.slow
@needs_tiny
def test_pruning_triangle_erases_triangles_and_keeps_circles(tiny_triangle_prune):
    from conceptedit.comfy_host.view import apply_edit
    model, _, edit, sampler = tiny_triangle_prune
    patched = apply_edit(model, None, edit)[0]
    assert _presence(sampler(model), "triangle") >= 0.75
    assert _presence(sampler(patched), "triangle") <= 0.25  # bench: 100 % -> 0 %
    assert _presence(sampler(patched), "circle") >= 0.75
    assert 0.05 < edit.metrics["pruned_fraction_ffn"] < 0.4


@pytest.mark.slow
@needs_tiny
def test_without_any_ffn_weight_the_tiny_model_still_draws_circles_not_triangles(tiny_triangle_prune):
    """Why ConceptPrune cannot erase circles on the tiny model (README): they do not pass through the
    FFNs at all, so no selection of ff.net.2 weights can remove them. Triangles do."""
    from conceptedit.comfy_host.view import apply_edit
    model, _, edit, sampler = tiny_triangle_prune
    floor = apply_edit(model, None, floor_edit(edit))[0]
    assert _presence(sampler(floor), "circle") >= 0.75
    assert _presence(sampler(floor), "triangle") <= 0.25

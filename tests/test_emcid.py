"""EMCID: the closed form against a dense reference (both stage-2 residuals), exactness as λ→0,
preservation of generic keys, C₀'s tokens, the low-rank storage, stage 1's constraint and progress,
the per-family hyper-parameters (official code) reaching stage 1, λ per text encoder, the node
inside real ComfyUI."""
import math

import pytest
import torch

from conceptedit.comfy_host.denoiser import ComfyDenoiser
from conceptedit.comfy_host.view import apply_edit
from conceptedit.comfy_host.text_hooks import ComfyTextModel
from conceptedit.editing import arch
from conceptedit.editing.emcid.captions import generic_captions
from conceptedit.editing.emcid import compute_emcid, stage1 as stage1_mod
from conceptedit.editing.emcid.stage2 import (caption_mask, concept_prompts, parse_pairs, read_keys, read_layer,
                                              resolve_defaults, second_moments, solve_update, stage2, to_change)
from conceptedit.editing.emcid.config import EmcidConfig
from conceptedit.editing.emcid.stage1 import optimise_delta
from conceptedit.editing.hooks import trace_inputs, trace_outputs
from conceptedit.editing.training import frozen_session
from conceptedit.editing.errors import InvalidInputError, NonFiniteError
from helpers import random_model, sdxl_style_model

ENC = "clip_l"
TINY = arch.get_family("tiny")
CONCEPTS = ["circle", "red square", "monet painting", "a blue star"]


def random_clip(seed: int = 0, dtype=torch.float32):
    """A real ComfyUI CLIP with the tiny text encoder's layout and random weights (ComfyUI may pick
    fp16 storage for text encoders; exactness tests want float32 weights)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from conceptedit.tiny.model import clip_classes, init_weights, text_transformer

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, clip_classes()[1])
    clip = comfy.sd.CLIP(target=target)
    torch.manual_seed(seed)
    with torch.no_grad():
        init_weights(text_transformer(clip.cond_stage_model))
    clip.cond_stage_model.to(dtype)
    return clip


@pytest.fixture(scope="module")
def clip():
    return random_clip()


@pytest.fixture(scope="module")
def text(clip):
    return ComfyTextModel(clip)


@pytest.fixture(scope="module")
def c0(text):
    return second_moments(text, ENC, TINY.text_encoders[0].edit_layers, EmcidConfig(n_captions=150))


def _targets(text, prompts, last, scale=0.5, seed=1):
    _, H = read_keys(text, ENC, prompts, None, last)
    g = torch.Generator().manual_seed(seed)
    return H + scale * H.norm(dim=1, keepdim=True) * torch.randn(H.shape, generator=g, dtype=H.dtype) / math.sqrt(H.shape[1])


def test_solve_update_equals_dense_formula():
    g = torch.Generator().manual_seed(0)
    n, m, d = 5, 40, 12
    K = torch.randn(n, m, generator=g, dtype=torch.float64)
    R = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = torch.randn(200, m, generator=g, dtype=torch.float64)
    C0 = X.T @ X / 200
    up, down = solve_update(K, R, C0, 3.0)
    dense = R.T @ K @ torch.linalg.inv(3.0 * C0 + K.T @ K)
    torch.testing.assert_close(up @ down, dense, rtol=1e-9, atol=1e-9)


def _fc2_out_at_concepts(text, prompts, layer):
    """The fc2 output of `layer` at each concept's last token, averaged over templates, read by a
    hook of this test's own (independent of `read_layer`)."""
    got = []
    name = f"text_model.encoder.layers.{layer}.mlp.fc2"
    with trace_outputs(text.modules(ENC), [name], lambda _n, out: got.append(out.detach().double())), torch.no_grad():
        text.forward(ENC, prompts.ids[ENC])
    out = got[0][torch.arange(len(prompts.text)), prompts.pos[ENC]]
    return out.reshape(prompts.n, prompts.templates, -1).mean(1)


@pytest.mark.parametrize("residual", ["memit", "official"])
def test_stage2_equals_dense_reference(text, clip, c0, residual):
    """Hooks applying the low-rank updates == writing dense ΔW into the weights and re-reading, with
    the residual at layer l_j: MEMIT's R = (Z − H_last)/(L − j), the official R = (Z − fc2_j)/(L − j).
    (Before the official residual became the default this test ran MEMIT's only.)"""
    layers = TINY.text_encoders[0].edit_layers
    prompts = concept_prompts(text, CONCEPTS, ("a photo of {}", "{}"))
    Z = _targets(text, prompts, layers[-1])
    ours, m = stage2(text, ENC, layers, prompts, Z, c0, lam=6000.0, residual=residual)
    assert m["residual"] == residual
    mods = text.modules(ENC)
    saved = {i: mods[f"text_model.encoder.layers.{i}.mlp.fc2"].weight.detach().clone() for i in layers}
    try:
        for j, (i, up, down) in enumerate(ours):
            K, H = read_keys(text, ENC, prompts, i, layers[-1])  # weights already hold earlier ΔW
            base = H if residual == "memit" else _fc2_out_at_concepts(text, prompts, i)
            R = (Z - base) / (len(layers) - j)
            ref = R.T @ K @ torch.linalg.inv(6000.0 * c0[i] + K.T @ K)
            assert float((up @ down - ref).norm() / ref.norm()) < 1e-5, j
            with torch.no_grad():
                mods[f"text_model.encoder.layers.{i}.mlp.fc2"].weight += ref.float()
    finally:
        with torch.no_grad():
            for i, w in saved.items():
                mods[f"text_model.encoder.layers.{i}.mlp.fc2"].weight.copy_(w)


def test_single_layer_small_lambda_maps_keys_to_targets(text, c0):
    """MEMIT's residual (explicit since the official one is the default): the layer's output reaches Z."""
    prompts = concept_prompts(text, CONCEPTS, ("a photo of {}",))
    Z = _targets(text, prompts, 2)
    ups, m = stage2(text, ENC, [2], prompts, Z, c0, lam=1e-7, residual="memit")
    applied = {2: (ups[0][1], ups[0][2].T)}
    _, H = read_keys(text, ENC, prompts, None, 2, applied)
    torch.testing.assert_close(H, Z, rtol=1e-4, atol=1e-4)
    assert m["gap_after"] < 1e-4


def test_official_residual_targets_the_fc2_output_not_the_layer_output(text, c0):
    """The official code's residual is Z − (the edited layer's own fc2 output): as λ→0 that fc2
    output becomes Z, so the layer's output is Z plus the rest of the residual stream (H − M), not
    Z; MEMIT's gives H = Z. The two updates differ by exactly the stream's other part."""
    prompts = concept_prompts(text, CONCEPTS, ("a photo of {}",))
    Z = _targets(text, prompts, 2)
    before = read_layer(text, ENC, prompts, 2, 2)
    ups, m = stage2(text, ENC, [2], prompts, Z, c0, lam=1e-7)  # the default: official
    assert m["residual"] == "official"
    after = read_layer(text, ENC, prompts, 2, 2, {2: (ups[0][1], ups[0][2].T)})
    torch.testing.assert_close(after.M, Z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.H, Z + (before.H - before.M), rtol=1e-4, atol=1e-4)
    assert float((after.H - Z).norm()) > 0.1 * float(Z.norm())
    memit, _ = stage2(text, ENC, [2], prompts, Z, c0, lam=1e-7, residual="memit")
    # on the edited keys, ΔW_official k − ΔW_memit k = (Z − M) − (Z − H) = H − M
    K = before.K
    diff = K @ (ups[0][1] @ ups[0][2]).T - K @ (memit[0][1] @ memit[0][2]).T
    torch.testing.assert_close(diff, before.H - before.M, rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidInputError, match="residual"):
        stage2(text, ENC, [2], prompts, Z, c0, lam=1.0, residual="nope")


def test_preserved_keys_barely_move_while_edited_keys_reach_targets():
    """Keys in the span of C₀ stay put as λ grows; the edited keys (partly outside it) still move by R."""
    g = torch.Generator().manual_seed(0)
    m, d, n = 64, 16, 5
    basis = torch.linalg.qr(torch.randn(m, 32, generator=g, dtype=torch.float64))[0]  # preserved subspace S
    P = torch.randn(2000, 32, generator=g, dtype=torch.float64) @ basis.T
    C0 = P.T @ P / P.shape[0] + 1e-7 * torch.eye(m, dtype=torch.float64)
    K = torch.randn(n, m, generator=g, dtype=torch.float64)
    R = torch.randn(n, d, generator=g, dtype=torch.float64)
    for lam in (1e2, 1e4):
        up, down = solve_update(K, R, C0, lam)
        dW = up @ down
        held_out = torch.randn(100, 32, generator=g, dtype=torch.float64) @ basis.T
        moved = (held_out @ dW.T).norm(dim=1) / held_out.norm(dim=1)
        assert float(moved.max()) < 1e-2 * float((K @ dW.T).norm(dim=1).min() / K.norm(dim=1).max())
        torch.testing.assert_close(K @ dW.T, R, rtol=0, atol=5e-3 * float(R.abs().max()))


def test_generic_captions_move_less_as_lambda_grows(text, c0):
    layers = TINY.text_encoders[0].edit_layers
    prompts = concept_prompts(text, CONCEPTS, ("a photo of {}",))
    caps = concept_prompts(text, generic_captions(64, seed=7), ("{}",))  # held-out captions
    Z = _targets(text, prompts, layers[-1])
    ratio = {}
    for lam in (10.0, 500.0):  # MEMIT's residual: its gap_after is the share of ‖Z − H‖ left
        ups, m = stage2(text, ENC, layers, prompts, Z, c0, lam=lam, residual="memit")
        ratio[lam] = []
        for i, up, down in ups:
            K, _ = read_keys(text, ENC, prompts, i, i)
            Kc, _ = read_keys(text, ENC, caps, i, i)
            ratio[lam].append(float((Kc @ down.T @ up.T).norm(dim=1).mean() / (K @ down.T @ up.T).norm(dim=1).mean()))
        assert m["gap_after"] < 0.6
    assert all(b < a for a, b in zip(ratio[10.0], ratio[500.0])), ratio
    assert max(ratio[500.0]) < 0.4, ratio


def test_low_rank_change_equals_dense():
    spec = TINY.text_encoders[0]
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(3, 256, generator=g, dtype=torch.float64)
    c = to_change(spec, up, down)
    assert c.kind == "lowrank" and c.rank == 3
    torch.testing.assert_close(c.delta(), (up @ down).float())
    big_up, big_down = torch.randn(64, 60, generator=g, dtype=torch.float64), torch.randn(60, 256, generator=g, dtype=torch.float64)
    c2 = to_change(spec, big_up, big_down)  # rank 60: dense is smaller
    assert c2.kind == "delta"
    torch.testing.assert_close(c2.delta(), (big_up @ big_down).float())


@pytest.mark.parametrize("residual", ["memit", "official"])
def test_no_stage1_edit_applies_as_patches_and_matches_hooks(clip, residual):
    model = random_model()
    cfg = EmcidConfig(use_stage1=False, lam=300.0, n_captions=150, templates=("a photo of {}",), residual=residual)
    pairs = [("circle", "square"), ("monet", "hokusai")]
    text = ComfyTextModel(clip)
    edit = compute_emcid(text, TINY, pairs, cfg)
    assert set(edit.changes) == {TINY.text_encoders[0].fc2_key(i) for i in TINY.text_encoders[0].edit_layers}
    assert all(c.kind == "lowrank" and c.rank == 2 for c in edit.changes.values())
    _, clip2, _ = apply_edit(model, clip, edit)
    src = concept_prompts(text, ["circle", "monet"], cfg.templates)
    dst = concept_prompts(text, ["square", "hokusai"], cfg.templates)
    _, Z = read_keys(text, ENC, dst, None, 2)
    _, H0 = read_keys(text, ENC, src, None, 2)
    _, H1 = read_keys(ComfyTextModel(clip2), ENC, src, None, 2)  # patched weights, no hooks
    if residual == "memit":  # MEMIT closes the gap to Z; the official residual aims each fc2 output at Z
        assert (H1 - Z).norm() < 0.5 * (H0 - Z).norm()
    assert edit.params["residual"] == residual and edit.metrics["stage2"][ENC]["lam"] == 300.0
    assert edit.metrics["stage2"][ENC]["gap_after"] == pytest.approx(float((H1 - Z).norm() / (H0 - Z).norm()), rel=1e-3)


def test_stage1_respects_norm_bound_and_lowers_loss(clip):
    model = random_model()
    text = ComfyTextModel(clip)
    den = ComfyDenoiser(model, clip)
    cfg = EmcidConfig(steps=12, lr=0.2, max_norm=0.3, sample_steps=2, templates=("a photo of {}", "{}"))
    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        deltas, h, stats = optimise_delta(text, den, "circle", "square", {ENC: 2}, cfg)
    assert float(deltas[ENC].norm()) <= 0.3 * float(h[ENC].norm()) * (1 + 1e-5)
    assert float(deltas[ENC].norm()) > 0
    assert len(stats["history"]) == 12
    assert stats["probe_after"] < stats["probe_before"]


def test_parse_pairs_and_errors():
    assert parse_pairs("cat -> dog\n# c\n\nvan gogh, a painter\nnudity ->") == [
        ("cat", "dog"), ("van gogh", "a painter"), ("nudity", "")]
    with pytest.raises(InvalidInputError, match="source -> destination"):
        parse_pairs("just a word")
    with pytest.raises(InvalidInputError, match="no concepts"):
        compute_emcid(None, TINY, [], EmcidConfig(use_stage1=False))


def test_captions_are_deterministic_and_varied():
    a, b = generic_captions(500), generic_captions(500)
    assert a == b and len(set(a)) == 500
    assert generic_captions(50, seed=1) != a[:50]


def _node(comfy):
    assert "ConceptEditTextEncoderEdit" in comfy.NODE_CLASS_MAPPINGS
    return comfy.NODE_CLASS_MAPPINGS["ConceptEditTextEncoderEdit"]()


def test_node_in_comfy_leaves_input_clip_unchanged(comfy, monkeypatch, tmp_path):
    from conceptedit.nodes import nodes_emcid
    monkeypatch.setattr(nodes_emcid, "emcid_cache_dir", lambda: str(tmp_path))
    with torch.inference_mode():  # as ComfyUI's executor (and its loaders) run
        model, clip = random_model(), random_clip()
        before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
        out_clip, edit, report = _node(comfy).execute(clip, model, "circle -> square\nmonet -> hokusai", lam=300.0,
                                                      steps=2, use_stage1=True, templates="a photo of {}",
                                                      lam_mode="absolute")
        after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not clip.patcher.patches and out_clip is not clip
    assert set(out_clip.patcher.patches) == set(edit.changes) and len(edit.changes) == 3
    assert edit.method == "emcid" and edit.concepts == ["circle -> square", "monet -> hokusai"]
    assert len(edit.metrics["stage1"]["probe_loss_after"]) == 2 and "gap_after" in report
    assert edit.params["lam_mode"] == "absolute" and edit.metrics["stage2"]["clip_l"]["lam"] == 300.0
    assert any(p.startswith("stage1-") for p in __import__("os").listdir(tmp_path))  # targets cached


def test_node_errors_are_clear(comfy, monkeypatch, tmp_path):
    from conceptedit.nodes import nodes_emcid
    monkeypatch.setattr(nodes_emcid, "emcid_cache_dir", lambda: str(tmp_path))
    node = _node(comfy)
    with torch.inference_mode():
        model, clip = random_model(), random_clip()
        with pytest.raises(InvalidInputError, match="no concepts"):
            node.execute(clip, model, "  \n# nothing\n", lam=300.0, steps=2, use_stage1=False)
        with pytest.raises(InvalidInputError, match="source -> destination"):
            node.execute(clip, model, "cat dog", lam=300.0, steps=2, use_stage1=False)
        bad = random_clip()
        bad.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.weight[0, 0] = float("nan")
        with pytest.raises(NonFiniteError, match="NaN"):
            node.execute(bad, model, "circle -> square", lam=300.0, steps=2, use_stage1=False)


def _sdxl_style_model(pooled_width: int, seed: int = 0, clip=None):
    """An SDXL-conditioned model (helpers.sdxl_style_model) and the host over it, built as every job builds it."""
    patcher = sdxl_style_model(pooled_width, seed)
    return patcher, ComfyDenoiser(patcher, clip if clip is not None else random_clip())


def test_adm_is_comfyuis_sdxl_vector_and_differentiable_in_pooled(comfy):
    _, den = _sdxl_style_model(64)
    pooled = torch.randn(2, 64, requires_grad=True)
    y = den.adm(pooled, 2)
    assert y.shape == (2, 64 + 1536) and torch.equal(y[:, :64], pooled)
    y.sum().backward()
    assert torch.equal(pooled.grad, torch.ones(2, 64))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert not torch.allclose(den.eps(x, t, c, y=den.adm(torch.zeros(2, 64), 2)), den.eps(x, t, c, y=y))
    assert ComfyDenoiser(random_model(), random_clip()).adm(torch.zeros(1, 64), 1) is None  # SD1-style: no y
    with pytest.raises(InvalidInputError, match="pooled"):
        den.adm(None, 2)


def test_stage1_trains_through_sdxl_vector_conditioning(clip):
    """Stage 1 on an SDXL-type model: the target uses y(pooled of the destination), the prediction
    y(pooled of the δ-edited source), so δ is trained through SDXL's vector conditioning too."""
    text = ComfyTextModel(clip)
    patcher, den = _sdxl_style_model(64, clip=clip)
    seen = []
    eps = den.eps
    den.eps = lambda x, t, c, y=None: (seen.append(None if y is None else (tuple(y.shape), y.requires_grad)),
                                       eps(x, t, c, y=y))[1]
    cfg = EmcidConfig(steps=4, lr=0.2, max_norm=0.5, sample_steps=2, templates=("a photo of {}", "{}"))
    with torch.enable_grad(), frozen_session(patcher.model.diffusion_model):
        deltas, h, stats = optimise_delta(text, den, "circle", "square", {ENC: 3}, cfg)
    shapes = {sh for sh, _ in seen}
    assert None not in seen and len(shapes) == 1 and next(iter(shapes))[1] == 64 + 1536
    assert float(deltas[ENC].norm()) > 0 and len(stats["history"]) == 4
    # δ's gradient really flows through y: cut the pooled out of y and δ comes out different
    adm = den.adm
    den.adm = lambda pooled, batch: adm(None if pooled is None else pooled.detach(), batch)
    with torch.enable_grad(), frozen_session(patcher.model.diffusion_model):
        cut, _, _ = optimise_delta(text, den, "circle", "square", {ENC: 1}, cfg)
    den.adm = adm
    with torch.enable_grad(), frozen_session(patcher.model.diffusion_model):
        full, _, _ = optimise_delta(text, den, "circle", "square", {ENC: 1}, cfg)
    assert not torch.equal(cut[ENC], full[ENC])


# ---- C₀ over BOS, real tokens and EOS ----------------------------------------------------------------
def test_c0_includes_bos_and_eos_positions(text):
    """C₀ averages k kᵀ over every caption's BOS, real tokens and EOS (the official layer_stats uses
    the attention mask), not over padding; before, BOS was left out."""
    cfg = EmcidConfig(n_captions=24, batch=10)
    caps = generic_captions(24)
    ids, n_real = text.tokenize(caps)
    n_real = n_real[ENC]
    bos, eos = ids[ENC][0, 0], ids[ENC][0, int(n_real[0]) + 1]
    assert bool((ids[ENC][:, 0] == bos).all())
    assert all(int(ids[ENC][r, int(n_real[r]) + 1]) == int(eos) for r in range(len(caps)))
    mask = caption_mask(n_real, ids[ENC].shape[1])
    assert bool(mask[:, 0].all()) and all(bool(mask[r, int(n_real[r]) + 1]) for r in range(len(caps)))
    assert int(mask.sum()) == int((n_real + 2).sum())  # nothing past EOS
    got = second_moments(text, ENC, [1], cfg)[1]
    seen = []
    with trace_inputs(text.modules(ENC), ["text_model.encoder.layers.1.mlp.fc2"],
                      lambda _n, x: seen.append(x.detach().double())), torch.no_grad():
        text.forward(ENC, ids[ENC])
    x = seen[0]
    j = torch.arange(x.shape[1])
    def moment(keep):
        k = x[keep]
        return k.T @ k / k.shape[0]
    with_bos = (j[None] <= n_real[:, None] + 1)
    torch.testing.assert_close(got, moment(with_bos), rtol=1e-6, atol=1e-9)
    without_bos = with_bos & (j[None] >= 1)  # the old choice
    assert float((got - moment(without_bos)).norm()) > 1e-3 * float(got.norm())


def test_captions_name_people_artists_and_styles():
    from conceptedit.editing.emcid.captions import ART_STYLES, ARTISTS, NAMES
    caps = generic_captions(2000)
    assert sum(any(a in c for a in ARTISTS) for c in caps) > 150
    assert sum(any(n in c for n in NAMES) for c in caps) > 100
    assert sum(any(f"{s} " in c for s in ART_STYLES) for c in caps) > 100


# ---- per-family hyper-parameters (official code) --------------------------------------------------------
def test_family_defaults_table():
    official = EmcidConfig(lam_mode="absolute")
    sd, used = resolve_defaults(official, "sd1", ("clip_l",))
    assert (sd.steps, sd.lr, sd.weight_decay, sd.pooled_weight, sd.max_norm, sd.lam) == (
        200, 0.2, 5e-4, 0.01, 1.5, {"clip_l": 4000.0})
    assert used == {"table": "sd1", "filled": ["steps", "lr", "weight_decay", "pooled_weight", "max_norm", "residual",
                                                     "lam"]}
    xl, used = resolve_defaults(official, "sdxl", ("clip_l", "clip_g"))
    assert (xl.steps, xl.lr, xl.weight_decay, xl.pooled_weight, xl.max_norm, xl.lam) == (
        100, 0.1, 8e-3, 0.005, 1.2, {"clip_l": 4000.0, "clip_g": 10000.0})
    assert resolve_defaults(EmcidConfig(), "sd2", ("clip_h",))[0].weight_decay == 5e-4
    assert resolve_defaults(official, "tiny", ("clip_l",))[0].lam == {"clip_l": 1000.0}
    # unset, λ is the official one per key dimension: times the width it was set at, exactly the official
    rel, used = resolve_defaults(EmcidConfig(), "sd1", ("clip_l",))
    assert rel.lam_mode == "relative" and used["filled"][-2:] == ["lam_mode", "lam"]
    assert rel.lam == {"clip_l": 4000.0 / 3072} and rel.lam_for("clip_l", 3072) == 4000.0
    xl_rel = resolve_defaults(EmcidConfig(), "sdxl", ("clip_l", "clip_g"))[0]
    assert (xl_rel.lam_for("clip_l", 3072), xl_rel.lam_for("clip_g", 5120)) == (4000.0, 10000.0)
    assert resolve_defaults(EmcidConfig(), "tiny", ("clip_l",))[0].lam_for("clip_l", 256) == 1000.0
    with pytest.raises(InvalidInputError, match="relative"):
        rel.lam_for("clip_l")  # a relative λ is never handed out as if it were absolute
    # unknown layouts: SDXL's with two text encoders, else SD's
    assert resolve_defaults(EmcidConfig(), "custom", ("clip_l", "clip_g"))[1]["table"] == "sdxl"
    assert resolve_defaults(EmcidConfig(), "custom", ("clip_g",))[1]["table"] == "sd1"
    # Flux: T5 alone is edited, with MEMIT's residual (the official one barely moves T5's state)
    fx, used = resolve_defaults(EmcidConfig(), "tiny-flux", ("clip_l", "t5xxl"))
    assert fx.residual == "memit" and fx.lam_for("t5xxl", 128) == 100.0 and fx.pooled_weight == 0.0
    assert resolve_defaults(EmcidConfig(), "custom", ("clip_l", "t5xxl"))[1]["table"] == "flux1"
    assert resolve_defaults(EmcidConfig(residual="official"), "flux1", ("clip_l", "t5xxl"))[0].residual == "official"
    assert sd.residual == "official"
    # what the user sets is kept; a single λ keeps working; a partial mapping is completed
    mine, used = resolve_defaults(EmcidConfig(lam=123.0, lr=0.05, weight_decay=0.0), "sdxl", ("clip_l", "clip_g"))
    assert (mine.lam, mine.lr, mine.weight_decay, mine.steps, mine.lam_mode) == (123.0, 0.05, 0.0, 100, "absolute")
    assert mine.lam_for("clip_g") == 123.0 and "lam" not in used["filled"] and "lr" not in used["filled"]
    part, _ = resolve_defaults(EmcidConfig(lam={"clip_g": 7.0}), "sdxl", ("clip_l", "clip_g"))
    assert part.lam == {"clip_l": 4000.0, "clip_g": 7.0}
    with pytest.raises(InvalidInputError, match="clip_h"):
        resolve_defaults(EmcidConfig(lam={"clip_h": 7.0}), "sdxl", ("clip_l", "clip_g"))
    with pytest.raises(InvalidInputError, match="λ"):
        EmcidConfig(lam={"clip_l": 0.0}).validate()
    # SD3: all three encoders, SDXL's CLIP values and Flux's T5 ones, the residual per encoder
    sd3_encoders = ("clip_l", "clip_g", "t5xxl")
    s3, used = resolve_defaults(official, "sd3-medium", sd3_encoders)
    assert s3.lam == {"clip_l": 4000.0, "clip_g": 10000.0, "t5xxl": 4000.0}
    s3_rel = resolve_defaults(EmcidConfig(), "sd3-medium", sd3_encoders)[0]
    assert [s3_rel.lam_for(e, w) for e, w in zip(sd3_encoders, (3072, 5120, 10240))] == [4000.0, 10000.0, 4000.0]
    assert (s3.steps, s3.pooled_weight) == (100, 0.005) and "residual" in used["filled"]
    assert s3.residual == {"clip_l": "official", "clip_g": "official", "t5xxl": "memit"}
    assert [s3.residual_for(e) for e in sd3_encoders] == ["official", "official", "memit"]
    assert resolve_defaults(EmcidConfig(), "custom", sd3_encoders, "sd3")[1]["table"] == "sd3-medium"
    assert resolve_defaults(EmcidConfig(), "custom", sd3_encoders)[1]["table"] == "sd3-medium"
    assert resolve_defaults(EmcidConfig(residual="memit"), "sd3-medium", sd3_encoders)[0].residual == "memit"
    part, used = resolve_defaults(EmcidConfig(residual={"clip_g": "memit"}), "sd3-medium", sd3_encoders)
    assert part.residual == {"clip_l": "official", "clip_g": "memit", "t5xxl": "memit"}
    assert part.to_dict()["residual"] == part.residual and "residual" in used["filled"]
    with pytest.raises(InvalidInputError, match="clip_h"):
        resolve_defaults(EmcidConfig(residual={"clip_h": "memit"}), "sd3-medium", sd3_encoders)
    with pytest.raises(InvalidInputError, match="residual must be one of"):
        EmcidConfig(residual={"clip_l": "other"}).validate()


@pytest.mark.parametrize("layout,table", [("sdxl_like", "sdxl"), ("sd1_like", "sd1")])
def test_family_defaults_reach_stage1_optimiser(comfy, monkeypatch, layout, table):
    """Through the job, on an SDXL-like (two text encoders, vector conditioning) and an SD-like
    layout (both 'custom', so the fallback decides): the optimiser gets the table's lr, the
    training loop its steps, stage 1 its weight decay, clamp and pooled weight, and with two
    encoders the pooled term covers both encoders' pooled outputs. Two steps are run (of the 100
    or 200 asked for), on a stand-in ε."""
    from conceptedit.comfy_host.jobs import EmcidJob, run as run_job
    from layouts import build
    want = {"sdxl": dict(steps=100, lr=0.1, weight_decay=8e-3, pooled_weight=0.005, max_norm=1.2),
            "sd1": dict(steps=200, lr=0.2, weight_decay=5e-4, pooled_weight=0.01, max_norm=1.5)}[table]
    seen = {"lr": [], "steps": [], "cfg": [], "stats": []}
    adam = torch.optim.Adam

    def spy_adam(params, lr, **kw):
        seen["lr"].append(lr)
        return adam(params, lr=lr, **kw)

    real_loop = stage1_mod.train_loop

    def spy_loop(steps, step, ctx, **kw):
        seen["steps"].append(steps)
        return real_loop(2, step, ctx, **kw)

    real_delta = stage1_mod.optimise_delta

    def spy_delta(text, den, src, dst, last, cfg, *a, **kw):
        seen["cfg"].append(cfg)
        out = real_delta(text, den, src, dst, last, cfg, *a, **kw)
        seen["stats"].append(out[2])
        return out

    # a cheap ε, differentiable in the context and y (what δ reaches): this test is about settings
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    monkeypatch.setattr(ComfyDenoiser, "eps", lambda self, x, t, c, y=None: (
        x * c.float().mean() + (0.0 if y is None else y.float().mean())))
    monkeypatch.setattr(torch.optim, "Adam", spy_adam)
    monkeypatch.setattr(stage1_mod, "train_loop", spy_loop)
    monkeypatch.setattr(stage1_mod, "optimise_delta", spy_delta)
    model, clip, spec = build(layout)
    cfg = EmcidConfig(use_stage1=True, templates=("a photo of {}",), sample_steps=1, n_captions=20)
    edit = run_job("emcid", model, clip, EmcidJob(pairs=[("circle", "square")], settings=cfg, width=64, height=64)).edit
    assert seen["lr"] == [want["lr"]] and seen["steps"] == [want["steps"]]
    got = seen["cfg"][0]
    assert {k: getattr(got, k) for k in want} == want
    assert {k: edit.params[k] for k in want} == want and edit.params["family_defaults"]["table"] == table
    stats = seen["stats"][0]
    assert stats["settings"] == want
    encoders = [f"clip_{n}" for n, _ in spec.clip]
    assert {k for k in stats["last_terms"] if k.startswith("decay.")} == {f"decay.{e}" for e in encoders}
    assert {k for k in stats["last_terms"] if k.startswith("pooled.")} == {f"pooled.{e}" for e in encoders}
    assert all(v > 0 for k, v in stats["last_terms"].items() if k.startswith("decay."))  # δ ≠ 0 at step 2
    if table == "sdxl":  # the official λ per key dimension, scaled to this layout's narrow encoders
        assert edit.params["lam"] == {"clip_l": 4000.0 / 3072, "clip_g": 10000.0 / 5120}
        assert edit.params["lam_mode"] == "relative"
        for e, m in edit.metrics["stage2"].items():
            assert m["lam"] == edit.params["lam"][e] * m["key_width"] and m["key_width"] < 3072


def test_lambda_per_encoder_is_used_per_encoder(comfy):
    """λ {clip_l: a, clip_g: b} on a two-encoder CLIP gives clip_l's changes of a single λ = a and
    clip_g's of a single λ = b."""
    from conceptedit.comfy_host.jobs import EmcidJob, run as run_job
    from layouts import build
    model, clip, _ = build("sdxl_like")

    def run(lam):
        cfg = EmcidConfig(use_stage1=False, lam=lam, n_captions=20, templates=("a photo of {}",))
        return run_job("emcid", model, clip, EmcidJob(pairs=[("circle", "square"), ("red", "blue")], settings=cfg)).edit

    both, low, high = run({"clip_l": 5.0, "clip_g": 5000.0}), run(5.0), run(5000.0)
    assert both.params["lam"] == {"clip_l": 5.0, "clip_g": 5000.0} and low.params["lam"] == 5.0
    assert {e: m["lam"] for e, m in both.metrics["stage2"].items()} == {"clip_l": 5.0, "clip_g": 5000.0}
    for key, change in both.changes.items():
        ref = (low if key.startswith("clip_l.") else high).changes[key]
        torch.testing.assert_close(change.delta(), ref.delta())
    # and λ matters: the other encoder's λ gives a different change
    key_g = next(k for k in both.changes if k.startswith("clip_g."))
    assert not torch.allclose(both.changes[key_g].delta(), low.changes[key_g].delta())


def test_node_zero_means_family_default(comfy, monkeypatch, tmp_path):
    import functools
    from conceptedit.nodes import nodes_emcid
    monkeypatch.setattr(nodes_emcid, "emcid_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(nodes_emcid, "EmcidConfig", functools.partial(EmcidConfig, n_captions=20))  # a quick C₀
    with torch.inference_mode():
        model, clip = random_model(), random_clip()
        _, edit, _ = _node(comfy).execute(clip, model, "circle -> square", lam=0.0, steps=0, use_stage1=False,
                                          templates="a photo of {}", residual="memit")
    # the node counts λ per key dimension: the tiny table's 1000 on its 256-wide keys
    assert edit.params["lam"] == {"clip_l": 1000.0 / 256} and edit.params["lam_mode"] == "relative"
    assert edit.metrics["stage2"][ENC]["lam"] == 1000.0 and edit.params["steps"] == 100
    assert edit.params["family_defaults"]["table"] == "tiny" and edit.params["residual"] == "memit"


def test_an_edit_that_closes_less_than_half_its_gap_says_to_lower_lambda(clip):
    """λ is in absolute units of the kept captions' keys: a λ far too large for this 64-wide encoder
    leaves the gap open, and the edit's metrics (shown by the node, logged) say which λ to lower."""
    text = ComfyTextModel(clip)
    cfg = dict(use_stage1=False, n_captions=40, templates=("a photo of {}",), residual="memit")
    stuck = compute_emcid(text, TINY, [("circle", "square")], EmcidConfig(lam=1e9, **cfg))
    assert stuck.metrics["stage2"][ENC]["gap_after"] > 0.5
    assert len(stuck.metrics["warnings"]) == 1 and "lower lam (now 1e+09" in stuck.metrics["warnings"][0]
    fine = compute_emcid(text, TINY, [("circle", "square")], EmcidConfig(lam=1.0, **cfg))
    assert fine.metrics["stage2"][ENC]["gap_after"] < 0.5 and "warnings" not in fine.metrics

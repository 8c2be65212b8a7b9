"""λ relative to the model's own statistics (issue 33): EMCID's λ per dimension of each layer's keys,
UCE's λ per unit of the text rows' mean square. The relative result does not depend on the keys'
scale or the encoder's width; the absolute mode is the paper's λ, bit for bit; the family default
reproduces the official λ on the width it was set at and reaches its target on a narrow encoder."""
import dataclasses
import math

import pytest
import torch

from helpers import random_clip

from conceptedit.comfy_host.text_hooks import ComfyTextModel
from conceptedit.editing import arch
from conceptedit.editing.emcid import compute_emcid, stage2 as stage2_mod
from conceptedit.editing.emcid.stage2 import concept_prompts, layer_reach, read_layer, second_moments, solve_update
from conceptedit.editing.emcid.config import EmcidConfig, absolute_lam
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.uce import closed_form as uce_mod
from conceptedit.editing.uce.closed_form import NormedText, build_text_system, compute_uce, text_scale
from conceptedit.editing.uce.config import UCEConfig

ENC = "clip_l"
TINY = arch.get_family("tiny")
# the tiny layout read as a model no table names: EMCID falls back to SD's table (λ 4000 at 3072-wide keys)
SD_LIKE = dataclasses.replace(TINY, name="custom")
PAIRS = [("circle", "square"), ("red", "blue")]


def _keys(m: int, n: int, seed: int):
    """C₀ from 10·m samples of one m-wide key distribution (a spread spectrum, as activations have),
    n keys of the same distribution and their asked changes R (n × 16)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    spread = torch.logspace(0, -2, m, dtype=torch.float64) ** 0.5
    draw = lambda k: (torch.randn(k, m, generator=g, dtype=torch.float64) * spread) @ basis.T  # noqa: E731
    X = draw(10 * m)
    return X.T @ X / X.shape[0], draw(n), torch.randn(n, 16, generator=g, dtype=torch.float64)


# ---- EMCID --------------------------------------------------------------------------------------
def test_relative_lambda_reaches_the_same_share_on_every_width_and_key_scale():
    """One relative λ writes the same share of the asked change on 64- and 256-wide keys of the same
    kind of distribution (within 0.06, the mean of four draws: random keys overlap more in 64
    dimensions), and on keys 100× larger; one absolute λ does not (λ/m decides the reach: for the
    captions' own keys E[kᵀC₀⁻¹k] = m)."""
    rel, absolute = 4000.0 / 3072, 4000.0
    got: dict[tuple, list[float]] = {}
    for m in (64, 256):
        for seed in range(4):
            C0, K, R = _keys(m, 4, seed=seed)
            for s in (1.0, 100.0):  # keys × s: C₀ × s²
                for mode, lam in (("relative", rel), ("absolute", absolute)):
                    _, down = solve_update(s * K, R, s * s * C0, absolute_lam(lam, mode, m))
                    got.setdefault((m, s, mode), []).append(layer_reach(s * K, R, down))
    reach = {k: sum(v) / len(v) for k, v in got.items()}
    assert reach[(64, 1.0, "relative")] == pytest.approx(reach[(256, 1.0, "relative")], abs=0.06)
    assert reach[(64, 100.0, "relative")] == pytest.approx(reach[(64, 1.0, "relative")], rel=1e-9)
    assert reach[(64, 100.0, "absolute")] == pytest.approx(reach[(64, 1.0, "absolute")], rel=1e-9)
    assert 0.3 < reach[(256, 1.0, "relative")] < 0.7
    # absolute: the width decides (4000 is 62 per dimension of 64-wide keys, 16 of 256-wide ones)
    assert reach[(64, 1.0, "absolute")] < 0.05 and reach[(256, 1.0, "absolute")] > 3 * reach[(64, 1.0, "absolute")]


def test_layer_reach_is_q_over_lambda_plus_q_for_one_key():
    C0, K, R = _keys(32, 1, seed=3)
    q = float(K[0] @ torch.linalg.solve(C0, K[0]))
    _, down = solve_update(K, R, C0, 50.0)
    assert layer_reach(K, R, down) == pytest.approx(q / (50.0 + q), rel=1e-9)
    with pytest.raises(InvalidInputError, match="lam_mode"):
        absolute_lam(1.0, "per-token", 32)


@pytest.fixture(scope="module")
def clip():
    return random_clip()


@pytest.fixture(scope="module")
def text(clip):
    return ComfyTextModel(clip)


@pytest.fixture(scope="module")
def run(text, tmp_path_factory):
    """compute_emcid of PAIRS on `text`, stage 2 alone; C₀ computed once for the module (cache)."""
    cache = str(tmp_path_factory.mktemp("emcid-c0"))

    def edit(family=TINY, **cfg):
        base = dict(use_stage1=False, n_captions=150, templates=("a photo of {}",))
        return compute_emcid(text, family, PAIRS, EmcidConfig(**{**base, **cfg}), cache_dir=cache)
    edit.cache = cache
    return edit


def test_absolute_mode_reproduces_the_papers_formula_bit_for_bit(text, run, monkeypatch):
    """An explicit λ (lam_mode unset or "absolute") reaches every solve exactly as given, and the edit
    is bit for bit ΔW = R Kᵀ (λC₀ + KKᵀ)⁻¹ layer by layer (MEMIT's residual, each layer reading the
    updates before it), as before the relative mode existed."""
    layers = TINY.text_encoders[0].edit_layers
    second_moments(text, ENC, layers, EmcidConfig(n_captions=150), cache_dir=run.cache)  # every C₀ read from here on
    C0 = second_moments(text, ENC, layers, EmcidConfig(n_captions=150), cache_dir=run.cache)
    seen = []
    real = stage2_mod.solve_update
    monkeypatch.setattr(stage2_mod, "solve_update", lambda K, R, C0, lam: (seen.append(lam), real(K, R, C0, lam))[1])
    implicit = run(lam=300.0, residual="memit")
    explicit = run(lam=300.0, lam_mode="absolute", residual="memit")
    assert seen == [300.0] * (2 * len(layers))
    assert implicit.params["lam_mode"] == explicit.params["lam_mode"] == "absolute"
    m = explicit.metrics["stage2"][ENC]
    assert (m["lam"], m["lam_rel"], m["key_width"], m["lam_per_layer"]) == (300.0, 300.0 / 256, 256, [300.0] * 3)
    # the previous code's loop, written out
    src = concept_prompts(text, [s for s, _ in PAIRS], ("a photo of {}",))
    Z = read_layer(text, ENC, concept_prompts(text, [d for _, d in PAIRS], ("a photo of {}",)), None, layers[-1]).H
    applied = {}
    for i, layer in enumerate(layers):
        r = read_layer(text, ENC, src, layer, layers[-1], applied)
        up, down = real(r.K, (Z - r.H) / (len(layers) - i), C0[layer], 300.0)
        applied[layer] = (up, down.T)
        key = TINY.text_encoders[0].fc2_key(layer)
        for edit in (implicit, explicit):
            assert torch.equal(edit.changes[key].delta(), stage2_mod.to_change(TINY.text_encoders[0], up, down).delta())


def test_relative_default_is_the_official_lambda_on_the_width_it_was_set_at(run):
    """The tiny table's λ 1000 was set on this 256-wide layout: unset, λ is 1000/256 per key dimension,
    which gives the very edit of the absolute 1000."""
    default = run()
    official = run(lam=1000.0)
    assert default.params["lam_mode"] == "relative" and default.params["lam"] == {ENC: 1000.0 / 256}
    assert default.metrics["stage2"][ENC]["lam_per_layer"] == [1000.0] * 3
    for key, change in official.changes.items():
        assert torch.equal(change.delta(), default.changes[key].delta()), key


@pytest.mark.parametrize("residual", ["memit", "official"])
def test_a_narrow_encoder_with_the_sd_default_reaches_its_target(run, residual):
    """SD's default λ on this 64-wide encoder (256-wide keys): as the absolute 4000 it holds every
    layer in place (each writes < 15 % of its change, the issue's 'redirected nothing') and the report
    says to lower lam, naming the relative mode; relative (the default), the same λ per key dimension
    as on CLIP-L writes about half at each layer, as 4000 does on 3072-wide keys, and no warning."""
    old = run(SD_LIKE, lam_mode="absolute", residual=residual)
    new = run(SD_LIKE, residual=residual)
    m_old, m_new = old.metrics["stage2"][ENC], new.metrics["stage2"][ENC]
    assert old.params["family_defaults"]["table"] == "sd1" and m_old["lam"] == 4000.0
    assert new.params["lam"] == {ENC: 4000.0 / 3072} and m_new["lam"] == pytest.approx(4000.0 * 256 / 3072)
    assert max(m_old["reach_per_layer"]) < 0.15 and len(old.metrics["warnings"]) == 1
    warning = old.metrics["warnings"][0]
    assert "lower lam (now 4000 absolute" in warning and "lam_mode relative" in warning
    assert sum(m_new["reach_per_layer"]) / 3 > 0.4 and "warnings" not in new.metrics
    if residual == "memit":
        assert m_old["gap_after"] > 0.7 and m_new["gap_after"] < 0.5


def test_official_residual_is_judged_by_the_layers_reach_not_the_gap(run):
    """The official residual aims each fc2 output at Z, so the gap to Z after stage 2 can exceed 1
    with every layer writing nearly all it was asked: that is no reason to tell the user to lower λ."""
    edit = run(lam=10.0, residual="official")
    m = edit.metrics["stage2"][ENC]
    assert m["gap_after"] > 0.5 and min(m["reach_per_layer"]) > 0.9 and "warnings" not in edit.metrics


def test_an_absolute_lambda_given_as_relative_is_named(run):
    """A λ in the paper's units (thousands) in relative mode is thousands of times too strong; the
    warning says which mode such a value belongs to."""
    edit = run(lam=4000.0, lam_mode="relative", residual="memit")
    m = edit.metrics["stage2"][ENC]
    assert m["lam"] == 4000.0 * 256 and m["lam_rel"] == 4000.0
    assert "now 4000 relative, i.e. λ 1.024e+06" in edit.metrics["warnings"][0]
    assert "needs lam_mode absolute" in edit.metrics["warnings"][0]
    with pytest.raises(InvalidInputError, match="lam_mode"):
        EmcidConfig(lam_mode="per-token").validate()


# ---- UCE ----------------------------------------------------------------------------------------
class _Text:
    """A host Text: fake word ids, fixed random embeddings per prompt (8 positions, width d)."""

    def __init__(self, d):
        self.d = d

    def token_ids(self, prompt):
        ids = [1] + [10 + sum(map(ord, w)) % 1000 for w in prompt.split()][:6] + [2]
        return ids + [2] * (8 - len(ids))

    def encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum((i + 1) * ord(c) for i, c in enumerate(p)) + 7)
            out.append(torch.randn(8, self.d, generator=g))
        return torch.stack(out)


def _uce_weights():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in TINY.expected_shapes().items()
            if k.endswith(("to_k.weight", "to_v.weight"))}


def _scaled(s):
    text = _Text(TINY.context_dim)
    return text if s == 1.0 else NormedText(text, lambda x: x * s)


def test_uce_relative_lambda_gives_the_same_edit_whatever_the_text_scale():
    """Text embeddings × s scale both Grams of M by s²; λ relative to their mean square scales with
    them, so ΔW = W·A is the same edit; the absolute λ is not (× 0.1: it holds the weights 100× more)."""
    weights = _uce_weights()
    cfg = dict(concepts=["red", "blue square"], default_preserve=False, preserve=["a green circle", "a cat"])
    rel = {s: compute_uce(_scaled(s), weights, TINY, UCEConfig(lam=0.5, lam_mode="relative", **cfg))
           for s in (0.1, 1.0, 10.0)}
    absolute = {s: compute_uce(_scaled(s), weights, TINY, UCEConfig(lam=0.5, **cfg)) for s in (0.1, 1.0)}
    for s in (0.1, 10.0):
        for key, change in rel[1.0].changes.items():
            torch.testing.assert_close(rel[s].changes[key].delta(), change.delta(), rtol=1e-4, atol=1e-5)
        assert rel[s].metrics["target_residual_mean"] == pytest.approx(rel[1.0].metrics["target_residual_mean"],
                                                                         rel=1e-4)
        used = rel[s].metrics["lam_used"]["tokens"]
        assert used["lam"] == pytest.approx(0.5 * used["text_scale"]) and used["lam_rel"] == 0.5
        assert used["text_scale"] == pytest.approx(s * s * rel[1.0].metrics["lam_used"]["tokens"]["text_scale"])
    assert absolute[0.1].metrics["target_residual_mean"] > 3 * absolute[1.0].metrics["target_residual_mean"]


def test_uce_absolute_mode_passes_lambda_unchanged_and_records_both_units(monkeypatch):
    seen = []
    real = uce_mod.solve_operator
    monkeypatch.setattr(uce_mod, "solve_operator", lambda C, G, P, lam, *a, **k: (seen.append(lam),
                                                                                  real(C, G, P, lam, *a, **k))[1])
    text = _Text(TINY.context_dim)
    cfg = UCEConfig(concepts=["red"], lam=0.5, default_preserve=False)
    edit = compute_uce(text, _uce_weights(), TINY, cfg)
    assert seen == [0.5] and edit.params["lam_mode"] == "absolute"
    system = build_text_system(text, cfg)
    scale = text_scale(system)
    X = torch.cat([system.C, system.P]).double()
    assert scale == pytest.approx(float(X.square().mean()), rel=1e-12)
    used = edit.metrics["lam_used"]["tokens"]
    assert (used["lam"], used["lam_mode"]) == (0.5, "absolute") and used["lam_rel"] == pytest.approx(0.5 / scale)
    with pytest.raises(InvalidInputError, match="lam_mode"):
        UCEConfig(concepts=["red"], lam_mode="per-row").validate()


def test_uce_warning_names_lambda_in_both_units():
    weights = _uce_weights()
    stuck = compute_uce(_scaled(0.01), weights, TINY, UCEConfig(concepts=["red"], lam=50.0, default_preserve=False))
    warning = stuck.metrics["warnings"][0]
    assert "lower lam (now 50 absolute" in warning and "lam_mode relative counts λ in that unit" in warning
    rel = compute_uce(_scaled(0.01), weights, TINY, UCEConfig(concepts=["red"], lam=0.5, lam_mode="relative",
                                                             default_preserve=False))
    assert rel.metrics["target_residual_mean"] < 0.5 and "warnings" not in rel.metrics
    assert math.isclose(rel.metrics["lam_used"]["tokens"]["lam_rel"], 0.5)


def test_an_edit_file_from_before_lam_mode_still_loads(run, tmp_path):
    """Older EMCID and UCE files carry `lam` (absolute) and no lam_mode or lam_rel: they load as they
    were written, changes bit for bit."""
    from conceptedit.editing.edit import Edit
    for edit in (run(lam=300.0, residual="memit"),
                 compute_uce(_Text(TINY.context_dim), _uce_weights(), TINY, UCEConfig(concepts=["red"]))):
        edit.params.pop("lam_mode")
        edit.metrics.pop("lam_used", None)
        for m in edit.metrics.get("stage2", {}).values():
            for k in ("lam_rel", "key_width", "lam_mode", "lam_per_layer", "reach_per_layer"):
                m.pop(k)
        path = edit.save(tmp_path / f"{edit.method}.safetensors")
        back = Edit.load(path)
        assert back.params == edit.params and "lam_mode" not in back.params
        for key, change in edit.changes.items():
            assert torch.equal(back.changes[key].delta(), change.delta()), key

"""UCE closed form: equals the explicit W' formula, keeps the preserve set, hits the targets, builds
the right keys on the real layouts, and runs as a node in real ComfyUI without touching its input."""
import hashlib
import os

import pytest
import torch

from helpers import random_clip

from conceptedit.editing import arch
from conceptedit.editing.errors import InvalidInputError, NonFiniteError
from conceptedit.editing.uce.closed_form import (build_text_system, compute_uce, layer_change, preserve_prompts,
                                                 solve_operator)
from conceptedit.editing.uce.config import UCEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(W, C, G, P, lam, se, sp):
    """W' = [λW + s_e Σ v* cᵀ + s_p Σ (W p) pᵀ][λI + s_e Σ c cᵀ + s_p Σ p pᵀ]⁻¹, literally (columns)."""
    W, C, G, P = (x.double() for x in (W, C, G, P))
    d = W.shape[1]
    left = lam * W + se * (W @ G.T) @ C + sp * (W @ P.T) @ P
    right = lam * torch.eye(d, dtype=torch.float64) + se * C.T @ C + sp * P.T @ P
    return left @ torch.linalg.inv(right)


def _system(n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, d, generator=g, dtype=torch.float64) for k in (n, n, m)]


@pytest.mark.parametrize("n,m,d,out", [(3, 4, 16, 10), (2, 0, 8, 24), (40, 10, 12, 7), (9, 30, 8, 5)])
def test_closed_form_equals_explicit_formula(n, m, d, out):
    C, G, P = _system(n, m, d)
    W = torch.randn(out, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    op = solve_operator(C, G, P, lam=0.5, erase_scale=1.3, preserve_scale=0.7)
    change, _ = layer_change(W, op, dtype=torch.float64)
    want = _reference(W, C, G, P, 0.5, 1.3, 0.7) - W
    assert change.kind == ("lowrank" if n * (out + d) < out * d else "delta")
    torch.testing.assert_close(change.delta(dtype=torch.float64), want, rtol=1e-5, atol=1e-6)


def test_lowrank_change_equals_dense_gram_route():
    C, G, P = _system(3, 5, 32)
    W = torch.randn(64, 32, dtype=torch.float64)
    low = solve_operator(C, G, P, 0.5, 1.0, 0.1)
    # the same system with C repeated past d takes the Gram (dense) route; scale to keep it equal
    dense = solve_operator(C.repeat(11, 1), G.repeat(11, 1), P, 0.5 * 11, 1.0, 0.1 * 11)
    cl, _ = layer_change(W, low, dtype=torch.float64)
    cd, _ = layer_change(W, dense, dtype=torch.float64)
    assert cl.kind == "lowrank" and cl.rank == 3 and cd.kind == "delta"
    torch.testing.assert_close(cl.delta(dtype=torch.float64), cd.delta(dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_preserved_vectors_map_unchanged_and_metric_is_right():
    C, G, P = _system(4, 6, 32, seed=3)
    W = torch.randn(20, 32, dtype=torch.float64)
    op = solve_operator(C, G, P, lam=0.5, erase_scale=1.0, preserve_scale=1e4)
    change, m = layer_change(W, op, dtype=torch.float64)
    dW = change.delta(dtype=torch.float64)
    rel = float((dW @ P.T).norm() / (W @ P.T).norm())
    assert rel < 1e-3
    assert m["preserve_rel_change"] == pytest.approx(rel, rel=1e-2)  # from float32 WᵀW
    change, m = layer_change(W, solve_operator(C, G, P, 0.5, 1.0, 0.1), dtype=torch.float64)
    dW1 = change.delta(dtype=torch.float64)
    assert m["preserve_rel_change"] == pytest.approx(float((dW1 @ P.T).norm() / (W @ P.T).norm()), rel=1e-4)
    # and the edit did move the erased vectors (the test above is not trivially passing)
    assert float((dW @ C.T).norm() / (W @ (G - C).T).norm()) > 0.5


def test_erase_hits_guide_values_when_lambda_and_preserve_vanish():
    C, G, P = _system(5, 3, 24, seed=4)
    W = torch.randn(16, 24, dtype=torch.float64)
    op = solve_operator(C, G, P, lam=1e-9, erase_scale=1.0, preserve_scale=0.0)
    change, m = layer_change(W, op, dtype=torch.float64)
    Wp = W + change.delta(dtype=torch.float64)
    torch.testing.assert_close(Wp @ C.T, W @ G.T, rtol=1e-6, atol=1e-6)
    assert m["target_residual"] < 1e-6
    _, m_weak = layer_change(W, solve_operator(C, G, P, lam=50.0, erase_scale=1.0, preserve_scale=0.0), torch.float64)
    assert m_weak["target_residual"] > 0.05  # larger λ leaves the targets visibly unmet


class _RandomText:
    """A host Text of any width with a fake tokenizer: words -> ids, EOS-padded to `length`."""

    def __init__(self, d, length=8, seed=0):
        self.d, self.length, self.seed = d, length, seed
        self.calls = []

    def token_ids(self, prompt):
        words = prompt.split()
        ids = [1] + [10 + (sum(map(ord, w)) % 1000) for w in words][: self.length - 2] + [2]
        return ids + [2] * (self.length - len(ids))

    def encode(self, prompts):
        self.calls.extend(prompts)
        out = []
        for p in prompts:
            # a stable digest, not hash(): str hashes change per process (PYTHONHASHSEED)
            digest = hashlib.sha256(f"{p}|{self.seed}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
            out.append(torch.randn(self.length, self.d, generator=g))
        return torch.stack(out)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_real_layouts_get_every_kv_key(family):
    fam = arch.get_family(family)
    shapes = fam.expected_shapes()
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in fam.attn2_kv_keys()}
    text = _RandomText(fam.context_dim)
    edit = compute_uce(text, weights, fam, UCEConfig(concepts=["cat", "dog"], default_preserve=False,
                                                     preserve=["a tree"], token_window="last"))
    assert set(edit.changes) == set(fam.attn2_kv_keys()) and len(edit.changes) == 2 * len(fam.blocks)
    for k, c in edit.changes.items():
        assert c.kind == "lowrank" and c.rank == 2 and c.shape == shapes[k]
    assert len(text.calls) == len(set(text.calls))  # every prompt encoded once
    assert edit.metrics["layers"] == len(edit.changes) and edit.metrics["edited_token_vectors"] == 2


def test_prompts_are_encoded_in_chunks_and_only_the_used_rows_are_kept():
    """150 concepts (three encoding chunks): C, G and P are the encoder's own rows at the window's
    positions, each prompt encoded once, and no call encodes more than one chunk."""
    text = _RandomText(6, length=8)
    concepts = [f"thing{i}" for i in range(150)]
    batches = []
    encode = text.encode
    text.encode = lambda ps: batches.append(len(ps)) or encode(ps)
    sys_ = build_text_system(text, UCEConfig(concepts=concepts, guide="", default_preserve=False,
                                             preserve=["a tree"], token_window="eos"))
    assert max(batches) <= 64 and sorted(text.calls) == sorted(set(text.calls))
    E = encode([c for c in concepts] + ["", "a tree"])
    # "thingN" = BOS thingN EOS: rows 1, 2; both map to ""'s EOS (1)
    torch.testing.assert_close(sys_.C, E[:150, 1:3].reshape(-1, 6))
    torch.testing.assert_close(sys_.G, E[150, 1].expand(300, -1))
    torch.testing.assert_close(sys_.P[:2], E[151, 1:3])


def test_a_context_of_another_length_is_refused_clearly():
    text = _RandomText(6, length=8)
    encode = text.encode
    text.encode = lambda ps: encode(ps) if ps == [""] else torch.cat([encode(ps)] * 2, dim=1)
    with pytest.raises(InvalidInputError, match="shorten the prompts"):
        build_text_system(text, UCEConfig(concepts=["cat"], default_preserve=False))


def test_aligned_tokens_map_words_to_guide_eos_not_bos():
    text = _RandomText(6, length=8)
    sys_ = build_text_system(text, UCEConfig(concepts=["red cat"], guide="", default_preserve=False))
    E = text.encode([""])[0]
    # "red cat" = BOS red cat EOS pad...: positions 1..7; targets in "": max(p - 3 + 1, 1)
    want = E[[1, 1, 1, 2, 3, 4, 5]]
    torch.testing.assert_close(sys_.G, want)
    # "" is preserved at BOS and at every position the window edits (1..7)
    assert sys_.C.shape == (7, 6) and sys_.P.shape == (8, 6)
    torch.testing.assert_close(sys_.P, E[:8])
    bos_only = build_text_system(text, UCEConfig(concepts=["red cat"], default_preserve=False,
                                                 preserve_unconditional=False))
    assert bos_only.P.shape == (1, 6)
    last = build_text_system(text, UCEConfig(concepts=["red cat"], guide="", default_preserve=False, token_window="last"))
    torch.testing.assert_close(last.G, E[[1]])  # EOS of "", never BOS
    eos = build_text_system(text, UCEConfig(concepts=["red cat"], guide="", default_preserve=False, token_window="eos"))
    torch.testing.assert_close(eos.C, text.encode(["red cat"])[0, 1:4])  # red, cat, EOS; no padding
    torch.testing.assert_close(eos.G, E[[1, 1, 1]])


def test_debias_targets_are_weighted_mix():
    text = _RandomText(6, length=8)
    s = build_text_system(text, UCEConfig(concepts=["doctor"], mode="debias", guide="male:3, female:1",
                                          default_preserve=False, token_window="last"))
    E = text.encode(["male doctor", "female doctor"])
    torch.testing.assert_close(s.G[0], 0.75 * E[0, 2] + 0.25 * E[1, 2])


def test_preserve_defaults_drop_edited_concepts():
    cfg = UCEConfig(concepts=["dog"], preserve=["my dog park", "a boat"])
    keep = preserve_prompts(cfg, ["dog"])
    assert "a boat" in keep and "a cat" in keep and not any("dog" in p for p in keep)


@pytest.mark.parametrize("cfg,match", [
    (UCEConfig(concepts=[]), "empty"), (UCEConfig(concepts=["  "]), "empty"),
    (UCEConfig(concepts=["x"], lam=float("nan")), "lam"), (UCEConfig(concepts=["x"], mode="nope"), "mode"),
    (UCEConfig(concepts=["x"], mode="redirect"), "target"), (UCEConfig(concepts=["x"], mode="debias", guide="a"), "two options"),
])
def test_bad_configs_are_clear_errors(cfg, match):
    with pytest.raises(InvalidInputError, match=match):
        cfg.validate()


def test_nan_embeddings_or_weights_are_refused():
    fam = arch.get_family("tiny")
    shapes = fam.expected_shapes()
    weights = {k: torch.randn(shapes[k]) for k in fam.attn2_kv_keys()}

    class NaNText(_RandomText):
        def encode(self, prompts):
            x = super().encode(prompts)
            x[0, 1, 0] = float("nan")
            return x

    with pytest.raises(NonFiniteError, match="NaN"):
        compute_uce(NaNText(fam.context_dim), weights, fam, UCEConfig(concepts=["cat"]))
    weights[fam.attn2_kv_keys()[3]][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="has NaN/Inf"):
        compute_uce(_RandomText(fam.context_dim), weights, fam, UCEConfig(concepts=["cat"]))
    with pytest.raises(InvalidInputError, match="CLIP that belongs"):
        compute_uce(_RandomText(32), {k: torch.randn(shapes[k]) for k in fam.attn2_kv_keys()}, fam,
                    UCEConfig(concepts=["cat"]))


# ---- in real ComfyUI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(comfy):
    return random_clip()


def test_node_runs_in_comfyui_and_leaves_input_unchanged(comfy, clip):
    import comfy.model_management as mm
    from helpers import random_model
    from conceptedit.comfy_host.text import ComfyText
    assert "ConceptEditCrossAttentionEdit" in comfy.NODE_CLASS_MAPPINGS
    node_cls = comfy.NODE_CLASS_MAPPINGS["ConceptEditCrossAttentionEdit"]
    model = random_model()
    before = {k: v.clone() for k, v in model.model_state_dict().items()}
    fam = arch.get_family("tiny")
    with torch.inference_mode():
        out, edit = node_cls().execute(model, clip, "circle\nsquare -> triangle", "erase", "", "a red star", False,
                                       0.5, 1.0, 0.1, "last")
        assert out is not model and not model.patches
        mm.load_models_gpu([out])
        sd = out.model_state_dict()
        k = fam.attn2_kv_keys()[0]
        torch.testing.assert_close(sd[k].float(), before[k].float() + edit.changes[k].delta(dtype=torch.float32),
                                   rtol=1e-4, atol=1e-5)
        # the edited layer maps circle's last token to the value of ""'s EOS (never BOS)
        text = ComfyText(clip)
        emb = text.encode(["circle", ""])
        last = text.token_ids("circle").index(text.token_ids("")[1]) - 1
        v_new, v_old = emb[0, last] @ sd[k].float().T, emb[0, last] @ before[k].float().T
        v_tgt = emb[1, 1] @ before[k].float().T
        assert (v_new - v_tgt).norm() < 0.1 * (v_old - v_tgt).norm()
        assert edit.metrics["target_residual_mean"] < 0.1
        mm.unload_all_models()
    for kk, v in model.model_state_dict().items():
        assert torch.equal(v, before[kk]), kk
    assert edit.method == "uce" and edit.concepts == ["circle", "square"]
    assert 0 <= edit.metrics["preserve_rel_change_mean"] < 1 and edit.fingerprint["family"] == "tiny"
    with pytest.raises(InvalidInputError, match="empty"):
        node_cls().execute(model, clip, "  \n# nothing", "erase", "", "", True, 0.5, 1.0, 0.1, "aligned")


def test_cli_reads_txt_and_csv_concept_files(tmp_path):
    from conceptedit.cli.uce import read_concepts
    (tmp_path / "c.txt").write_text("circle  # a shape\n\nsquare -> triangle\n")
    (tmp_path / "c.csv").write_text("concept,target\ncircle,\nsquare,triangle\n")
    assert read_concepts(str(tmp_path / "c.txt")) == ["circle", "square -> triangle"]
    assert read_concepts(str(tmp_path / "c.csv")) == ["circle", "square -> triangle"]
    with pytest.raises(InvalidInputError, match="no concept file"):
        read_concepts(str(tmp_path / "missing.txt"))


def test_factored_guide_grams_equal_the_dense_ones(monkeypatch):
    """Many concepts sharing a guide: Cᵀ G and Gᵀ G from (basis, sparse select) equal the dense
    Grams, so the solve and its metrics are the same (two guide slots with weights, as debias)."""
    g = torch.Generator().manual_seed(5)
    n, u, d, m = 400, 12, 24, 30
    C, P = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    V = torch.randn(u, d, generator=g)
    rows = torch.arange(n).repeat(2)
    cols = torch.cat([torch.arange(n) % u, (torch.arange(n) * 7 + 3) % u])
    w = torch.cat([torch.full((n,), 0.7), torch.full((n,), 0.3)]).double()
    S = torch.sparse_coo_tensor(torch.stack([rows, cols]), w, (n, u)).coalesce()
    G = torch.sparse.mm(S, V.double()).float()
    from conceptedit.editing.uce import closed_form as uce
    calls = []
    real = uce._factored_guide_grams
    monkeypatch.setattr(uce, "_factored_guide_grams", lambda *a: (calls.append(1), real(*a))[1])
    dense = solve_operator(C, G, P, 0.5, 1.0, 0.1)
    assert not calls
    fact = solve_operator(C, G, P, 0.5, 1.0, 0.1, G_basis=V, G_select=S)
    assert calls  # the factored route really ran (else this compares the dense route with itself)
    for name in ("A", "residual_gram", "target_gram", "preserve_moved"):
        torch.testing.assert_close(getattr(fact, name), getattr(dense, name), rtol=1e-4, atol=1e-3)
    assert float(dense.target_gram.abs().max()) > 1.0  # not a trivially zero comparison


def test_low_rank_metrics_equal_the_dense_products():
    """Few edited rows (n < d): the metric matrices come from the rank-n factors, and they equal the
    d × d products of their definitions."""
    g = torch.Generator().manual_seed(7)
    n, d, m = 5, 40, 30
    C, G, P, U = (torch.randn(k, d, generator=g) for k in (n, n, m, 4))
    op = solve_operator(C, G, P, 0.3, 1.0, 0.5, U=U)
    assert op.R is not None and op.n == n
    A = op.A
    B = torch.eye(d, dtype=torch.float64) + A.T
    Gcc, Gcg, Ggg = (x.double().T @ y.double() for x, y in ((C, C), (C, G), (G, G)))
    Gpp, Guu = P.double().T @ P.double(), U.double().T @ U.double()
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # noqa: E731  (Grams: float32 chunks)
    close(op.residual_gram, B.T @ Gcc @ B - B.T @ Gcg - Gcg.T @ B + Ggg)
    close(op.preserve_moved, A @ Gpp @ A.T)
    close(op.uncond_moved, A @ Guu @ A.T)
    assert float(op.preserve_moved.abs().max()) > 1e-2 and float(op.residual_gram.abs().max()) > 0.1
    # and the residual is what is left of the targets: Σ ‖(I + A)c − g‖² over the rows
    e = C.double() @ (torch.eye(d, dtype=torch.float64) + A).T - G.double()
    close(op.residual_gram.trace(), e.square().sum())
    assert float(op.residual_gram.trace()) < float(op.target_gram.trace())


@pytest.mark.parametrize("m", [30, 60])  # preserve rows fewer / more than d: both ways of ⟨WᵀW, Σ p pᵀ⟩
def test_low_rank_layer_metrics_equal_the_ones_from_w_transpose_w(m):
    """layer_change's metrics from the rank-n factors (no d × d WᵀW per layer) equal the WᵀW ones,
    and the change itself is the same."""
    from dataclasses import replace
    g = torch.Generator().manual_seed(8)
    n, d, out = 4, 40, 24
    C, G, P, U = (torch.randn(k, d, generator=g) for k in (n, n, m, 5))
    W = torch.randn(out, d, generator=g)
    op = solve_operator(C, G, P, 0.3, 1.0, 0.5, U=U)
    assert op.low is not None
    fast, fast_m = layer_change(W, op)
    slow, slow_m = layer_change(W, replace(op, low=None))
    assert set(fast_m) == set(slow_m) == {"preserve_rel_change", "target_residual", "uncond_rel_change"}
    for k in fast_m:
        assert fast_m[k] == pytest.approx(slow_m[k], rel=1e-4, abs=1e-7), k
    assert 0.01 < fast_m["preserve_rel_change"] and 0 < fast_m["target_residual"] < 1
    torch.testing.assert_close(fast.delta(dtype=torch.float64), slow.delta(dtype=torch.float64))


def test_unconditional_prompt_is_preserved_at_every_edited_position(comfy):
    """Classifier-free guidance reads "" for every prompt: its keys/values at the positions the window
    edits stay put (they moved freely when only its BOS was preserved)."""
    from conceptedit.comfy_host.patches import original_weights
    from conceptedit.comfy_host.text import ComfyText
    from conceptedit.tiny.comfy_model import load_tiny

    model, clip = load_tiny()[:2]
    text = ComfyText(clip)
    weights, fam = original_weights(model), arch.get_family("tiny")
    uncond = text.encode([""])[0].float()

    def moved(edit):  # ‖ΔW u‖ / ‖W u‖ over every position of "", mean over the K/V layers
        r = [float((uncond @ c.delta(dtype=torch.float32).T).norm() / (uncond @ weights[k].float().T).norm())
             for k, c in edit.changes.items()]
        return sum(r) / len(r)

    old = compute_uce(text, weights, fam, UCEConfig(concepts=["red"], preserve_unconditional=False))
    new = compute_uce(text, weights, fam, UCEConfig(concepts=["red"]))
    assert moved(new) < 0.75 * moved(old)  # aligned window, tiny model: 0.042 -> 0.027
    assert new.metrics["uncond_rel_change_max"] < 0.06
    assert new.metrics["target_residual_mean"] < 1.1 * old.metrics["target_residual_mean"]  # the erasure still lands


def test_expansion_and_empty_guide_follow_the_official_script():
    from conceptedit.editing.uce import closed_form as uce

    cfg = UCEConfig(concepts=["van gogh"], expand="artist")
    srcs, targets = uce._plan(cfg)
    assert srcs == ["van gogh", "painting by van gogh", "art by van gogh", "artwork by van gogh",
                    "picture by van gogh", "style of van gogh"]
    assert [t[0][1] for t in targets] == ["art", "painting by art", "art by art", "artwork by art", "picture by art",
                                          "style of art"]  # the official default guide for artists
    srcs, targets = uce._plan(UCEConfig(concepts=["cat -> dog"], expand="object"))
    assert ("photo of cat", [(1.0, "photo of dog")]) in list(zip(srcs, targets))
    with pytest.raises(InvalidInputError, match="expand"):
        UCEConfig(concepts=["x"], expand="people").validate()
    text = _RandomText(16)
    empty = text.encode([""])[0]
    for where, pos in (("eos", 1), ("bos", 0)):  # 'last' window, empty guide
        system = build_text_system(text, UCEConfig(concepts=["cat"], token_window="last", empty_guide=where))
        assert torch.equal(system.G[0], empty[pos]), where


def test_an_edit_that_reaches_less_than_half_its_target_says_what_to_change():
    """λ weighs the kept rows in absolute units: on this 24-wide random model λ 1e6 holds every weight in
    place, and the edit's metrics (which the nodes show and log) say to lower it; a λ that reaches the
    target says nothing."""
    fam = arch.get_family("tiny")
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) for k, s in fam.expected_shapes().items() if k.endswith(("to_k.weight",
                                                                                                       "to_v.weight"))}
    text = _RandomText(fam.context_dim, length=8)
    stuck = compute_uce(text, weights, fam, UCEConfig(concepts=["red"], lam=1e6, default_preserve=False))
    assert stuck.metrics["target_residual_mean"] > 0.5
    assert len(stuck.metrics["warnings"]) == 1 and "lower lam (now 1e+06 absolute" in stuck.metrics["warnings"][0]
    fine = compute_uce(text, weights, fam, UCEConfig(concepts=["red"], lam=0.1, default_preserve=False))
    assert fine.metrics["target_residual_mean"] < 0.5 and "warnings" not in fine.metrics

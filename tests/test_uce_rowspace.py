"""UCE's closed form in the row space (r = n + m + u rows < width d): the same edit and the same
metrics as the dense d × d route, and no d × d tensor at all.

Tolerances (float64 data): ΔW, the d × d metric matrices and the per-layer metrics of the row space
equal the dense route's and the metrics' definitions to 1e-6 relative (entries below 1e-9 of the
largest are compared absolutely; measured: ~1e-14); against the dense route's own per-layer metrics,
which read a float32 WᵀW where n > d / 8, to 1e-5. Float32 rows (as the text encoders give): ΔW within
2e-6 of the float64 solve of the same rows, metrics within 1e-5."""
import pytest
import torch
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.uce import closed_form as uce
from conceptedit.editing.uce.closed_form import TextSystem, layer_change, solve_operator
from conceptedit.editing.uce.config import UCEConfig
from torch.utils._python_dispatch import TorchDispatchMode

LAM, SE, SP = 0.5, 1.3, 0.7
DENSE_FIELDS = ("A", "preserve_gram", "preserve_moved", "residual_gram", "target_gram", "uncond_gram", "uncond_moved")


def _rows(n, m, u, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype) for k in (n, n, m, u)]


def _close(a, b, rtol=1e-6):
    """Relative to the larger matrix's largest entry: a row-space product and a d × d one round
    differently, so entries near zero agree absolutely, not relatively."""
    a, b = a.double(), b.double()
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-9 * max(float(b.abs().max()), 1e-30))


def _dw(change):
    """ΔW in float64 (Change.delta multiplies a low-rank pair in float32)."""
    t = {k: v.double() for k, v in change.tensors.items()}
    return t["up"] @ t["down"] if change.kind == "lowrank" else t["delta"]


def _dense(monkeypatch, *args, **kw):
    with monkeypatch.context() as mp:
        mp.setattr(uce, "_uses_row_space", lambda *a: False)
        op = solve_operator(*args, **kw)
    assert not op.row_space
    return op


def _forced_row_space(monkeypatch, *args, **kw):
    with monkeypatch.context() as mp:
        mp.setattr(uce, "_uses_row_space", lambda *a: True)
        op = solve_operator(*args, **kw)
    assert op.row_space
    return op


def _literal(W, C, G, P, lam, se, sp):
    """ΔW from its definition, W' = [λW + s_e W Gᵀ C + s_p W Pᵀ P] M⁻¹ − W (itself only good to
    ~1e-8 of W's scale: W' − W cancels)."""
    d = W.shape[1]
    M = lam * torch.eye(d, dtype=torch.float64) + se * C.T @ C + sp * P.T @ P
    return torch.linalg.solve(M, (lam * W + se * W @ G.T @ C + sp * W @ P.T @ P).T).T - W


def _metrics(W, dW, C, G, P, U):
    """The per-layer metrics from their definitions: ‖ΔW Pᵀ‖ / ‖W Pᵀ‖, ‖W'Cᵀ − W Gᵀ‖ / ‖W (C − G)ᵀ‖,
    ‖ΔW Uᵀ‖ / ‖W Uᵀ‖."""
    def rel(x, y):
        return float(x.norm() / y.norm())

    m = {"preserve_rel_change": rel(dW @ P.T, W @ P.T) if P.shape[0] else 0.0,
         "target_residual": rel((W + dW) @ C.T - W @ G.T, W @ (C - G).T)}
    if U.shape[0]:
        m["uncond_rel_change"] = rel(dW @ U.T, W @ U.T)
    return m


# (n, m, u, d, out): r = n + m + u below d (low-rank and dense storage, no preserve rows, few and
# many edited rows) and above it (forced into the row space: the algebra holds for any r)
BELOW = [(3, 10, 4, 64, 48), (20, 30, 5, 64, 40), (40, 10, 3, 64, 24), (2, 0, 0, 16, 8), (1, 60, 2, 96, 16)]
ABOVE = [(10, 60, 5, 32, 20), (40, 10, 0, 32, 12), (5, 100, 8, 48, 30)]


@pytest.mark.parametrize("n,m,u,d,out", BELOW + ABOVE)
@pytest.mark.parametrize("sp", [SP, 0.0])
def test_row_space_equals_dense_route(monkeypatch, n, m, u, d, out, sp):
    C, G, P, U = _rows(n, m, u, d, seed=n + m + d)
    W = torch.randn(out, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    below = n + m + u < d
    args = (C, G, P, LAM, SE, sp)
    row = solve_operator(*args, U=U) if below else _forced_row_space(monkeypatch, *args, U=U)
    assert row.row_space and all(f not in row.__dict__ for f in DENSE_FIELDS)  # nothing d × d yet
    dense = _dense(monkeypatch, *args, U=U)
    if not below:
        assert not solve_operator(*args, U=U).row_space  # the rule keeps r ≥ d dense

    change, metrics = layer_change(W, row, dtype=torch.float64)
    assert change.kind == ("lowrank" if n * (out + d) < out * d else "delta")
    dW = _dw(change)
    _close(dW, W @ dense.A)
    torch.testing.assert_close(dW, _literal(W, C, G, P, LAM, SE, sp), rtol=1e-6, atol=1e-7 * float(W.abs().max()))
    want = _metrics(W, W @ dense.A, C, G, P, U)
    assert set(metrics) == set(want)
    for k, v in want.items():
        assert metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
    _, dense_metrics = layer_change(W, dense, dtype=torch.float64)
    for k, v in dense_metrics.items():
        assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    assert metrics["target_residual"] > 1e-3 and (m == 0 or metrics["preserve_rel_change"] > 1e-4)
    # the d × d fields, built from the factors only now that they are read
    for f in DENSE_FIELDS:
        if getattr(dense, f) is None:
            assert getattr(row, f) is None, f
        else:
            _close(getattr(row, f), getattr(dense, f))


def test_float32_rows_are_solved_at_least_as_well_as_by_the_dense_route(monkeypatch):
    """Float32 rows, as the text encoders give: against the float64 solve of the same rows, the row
    space is off by the float32 storage of up/down alone (~5e-7 here), the dense route by its float32
    d × d Grams too (~2e-5 here, whose rounding in the d − r directions where M is λI is divided by λ)."""
    C, G, P, U = _rows(12, 40, 6, 256, seed=3, dtype=torch.float32)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    ref_change, ref = layer_change(W.double(), solve_operator(*(x.double() for x in (C, G, P)), LAM, SE, SP,
                                                              U=U.double()), dtype=torch.float64)
    want = _dw(ref_change)
    row = solve_operator(C, G, P, LAM, SE, SP, U=U)
    assert row.row_space
    (cr, mr), (cd, md) = layer_change(W, row), layer_change(W, _dense(monkeypatch, C, G, P, LAM, SE, SP, U=U))

    def err(c):
        return float((_dw(c) - want).abs().max() / want.abs().max())

    assert err(cr) < 2e-6 and err(cr) <= err(cd)
    for k in ref:
        assert mr[k] == pytest.approx(ref[k], rel=1e-5), k
        assert md[k] == pytest.approx(ref[k], rel=1e-2), k


def test_guide_basis_row_space_equals_the_factored_dense_route(monkeypatch):
    """Many edited rows sharing few guide vectors (G = select @ basis): the dense route takes the
    factored guide Grams; the row space reads G itself. Same edit, same metrics."""
    g = torch.Generator().manual_seed(5)
    n, k, d, m, out = 48, 6, 160, 20, 32
    C, P, U = (torch.randn(r, d, generator=g, dtype=torch.float64) for r in (n, m, 3))
    V = torch.randn(k, d, generator=g, dtype=torch.float64)
    rows = torch.arange(n).repeat(2)
    cols = torch.cat([torch.arange(n) % k, (torch.arange(n) * 5 + 1) % k])
    w = torch.cat([torch.full((n,), 0.6), torch.full((n,), 0.4)]).double()
    S = torch.sparse_coo_tensor(torch.stack([rows, cols]), w, (n, k), check_invariants=True).coalesce()
    G = torch.sparse.mm(S, V)
    calls = []
    real = uce._factored_guide_grams
    monkeypatch.setattr(uce, "_factored_guide_grams", lambda *a: (calls.append(1), real(*a))[1])
    row = solve_operator(C, G, P, LAM, SE, SP, G_basis=V, G_select=S, U=U)
    assert row.row_space and not calls
    dense = _dense(monkeypatch, C, G, P, LAM, SE, SP, G_basis=V, G_select=S, U=U)
    assert calls  # the factored Grams really served the dense route
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    (cr, mr), (_, md) = layer_change(W, row, dtype=torch.float64), layer_change(W, dense, dtype=torch.float64)
    _close(_dw(cr), W @ dense.A)
    for key in md:
        assert mr[key] == pytest.approx(md[key], rel=1e-6), key
    for f in DENSE_FIELDS:
        _close(getattr(row, f), getattr(dense, f))


def test_rule_rows_below_the_width():
    C, G, P, U = _rows(4, 10, 3, 32)
    assert solve_operator(C, G, P, LAM, SE, SP, U=U).row_space           # r = 17 < 32
    assert not solve_operator(C, G, P.repeat(3, 1), LAM, SE, SP, U=U).row_space  # 4 + 30 + 3 ≥ 32
    assert not solve_operator(C, G, P.repeat(3, 1)[:25], LAM, SE, SP, U=U).row_space  # r = d
    assert solve_operator(C, G, P.repeat(3, 1)[:24], LAM, SE, SP, U=U).row_space


def test_lambda_zero_with_fewer_rows_than_the_width_is_refused():
    C, G, P, U = _rows(4, 10, 3, 32)
    with pytest.raises(InvalidInputError, match="raise λ"):
        solve_operator(C, G, P, 0.0, SE, SP, U=U)


class _NoSquare(TorchDispatchMode):
    """Records every aten op whose output has d² elements or more."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_no_d_by_d_tensor_at_d_4096():
    """d = 4096, r = 300: the solve, a layer's change and metrics, and one RECE round on the stacked
    weights allocate nothing of d × d elements (a dense route's first Gram would)."""
    d, n, m, u, out = 4096, 60, 220, 20, 512
    C, G, P, U = _rows(n, m, u, d, seed=9, dtype=torch.float32)
    Ws = [torch.randn(out, d, generator=torch.Generator().manual_seed(i)) / d ** 0.5 for i in range(2)]
    system = TextSystem(C=C, G=G, P=P, concept_rows=[n], preserve_prompts=[], U=U)
    cfg = UCEConfig(concepts=["x"], harden_rounds=1)
    guard = _NoSquare(d * d)
    with guard:
        op = solve_operator(C, G, P, cfg.lam, cfg.erase_scale, cfg.preserve_scale, U=U)
        change, metrics = layer_change(Ws[0], op)
        hardened, rounds = uce.harden(system, op, Ws, cfg, torch.device("cpu"), uce.RunContext())
        layer_change(Ws[1], hardened)
    assert not guard.seen, guard.seen[:5]
    assert op.row_space and hardened.row_space and hardened.n == 2 * n
    assert change.kind == "lowrank" and 0 < metrics["target_residual"] < 1
    assert all(0 <= rounds[0][k] < float("inf") for k in ("regeneration_before", "regeneration_after"))
    # and the guard does see a dense route's d × d Gram
    with guard:
        uce._gram(C[:2])
    assert guard.seen


def test_stacked_rece_equals_the_d_by_d_form():
    """RECE on the stacked weights (N < d rows) gives the c' and the regeneration error of Σ WᵀW."""
    g = torch.Generator().manual_seed(4)
    d = 48
    C, G, P, U = _rows(3, 8, 2, d, seed=4)
    Ws = [torch.randn(k, d, generator=g, dtype=torch.float64) for k in (10, 14)]
    op = solve_operator(C, G, P, LAM, SE, SP, U=U)
    Wst, stacked = uce._kk(Ws, "cpu")
    assert stacked and Wst.shape == (24, d)
    K = sum(W.T @ W for W in Ws)
    C1 = uce.regenerating_embeddings(op, Wst, C, 0.1, stacked=True)
    _close(C1, uce.regenerating_embeddings(op, K, C, 0.1))
    assert uce._regeneration(op, Wst, C1, C, True) == pytest.approx(uce._regeneration(op, K, C1, C), rel=1e-6)

"""The host layer's contract: one job signature for every method, one view of the model per call,
weights read the same whatever ComfyUI has loaded where (low-VRAM), and the library's shared
diffusion formulas and training-loop skeleton."""
import inspect
import math

import pytest
import torch

from conceptedit.comfy_host import jobs, patches, view
from conceptedit.comfy_host.patches import original_weights, patched_weights
from conceptedit.comfy_host.view import apply_edit
from conceptedit.editing import arch
from conceptedit.editing.diffusion import add_noise, predict_x0
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import Cancelled, InvalidInputError, NonFiniteError
from conceptedit.editing.hosts import RunContext
from conceptedit.editing.prompts import TINY_DEFAULTS
from conceptedit.editing.training import TrainLog, edit_as_fixed, train_loop
from conceptedit.editing.uce.config import UCEConfig
from helpers import random_clip, random_model

FAM = arch.get_family("tiny")


# ---- one signature, one registry -----------------------------------------------------------------
def test_every_method_has_one_contract_and_is_registered():
    """Each method package holds a config.py with its job config and a compute.py with
    ``compute(host, config) -> Edit``; the one registry lists them, and `jobs.run` is the only way
    the hosts run one (no per-method function is left in comfy_host)."""
    from conceptedit.editing.methods import METHODS
    assert set(METHODS) == {"uce", "concept_prune", "emcid", "unlearn", "distill_unlearn"}
    for name, m in METHODS.items():
        sig = inspect.signature(m.compute)
        assert list(sig.parameters) == ["host", "config"], name
        assert sig.return_annotation in ("Edit", Edit), name
        assert sig.parameters["config"].annotation == m.config.__name__, name
        assert issubclass(m.config, jobs.Job) and "settings" in m.config.__dataclass_fields__, name
        package = m.compute.__module__.rsplit(".", 1)[0]
        assert m.compute.__module__ == f"{package}.compute" and m.config.__module__ == f"{package}.config", name
    assert list(inspect.signature(jobs.run).parameters) == ["name", "model", "clip", "config", "ctx"]
    assert not [n for n in METHODS if hasattr(jobs, n)], "a per-method job function is back in comfy_host.jobs"


def test_run_refuses_an_unknown_method_or_a_config_of_another_method(comfy):
    with pytest.raises(InvalidInputError, match="unknown method"):
        jobs.run("rome", None, None, jobs.UCEJob(settings=UCEConfig(concepts=["x"])))
    with pytest.raises(InvalidInputError, match="takes a UCEJob"):
        jobs.run("uce", None, None, jobs.UnlearnJob(concept="x"))


def test_jobs_refuse_bad_input_with_what_to_connect(comfy):
    model = random_model("tiny", seed=8)
    with pytest.raises(InvalidInputError, match="at least 8 pixels"):
        jobs.latent_size(4, 512)
    assert jobs.latent_size(0, 0) is None and jobs.latent_size(512, 256) == (32, 64)
    with pytest.raises(InvalidInputError, match="connect a MODEL"):
        view.ModelView(None)
    with pytest.raises(InvalidInputError, match="connect the CLIP that came with this MODEL"):
        view.ModelView(model).text
    te = FAM.te_fc2_keys()[0]
    shape = FAM.expected_shapes()[te]
    te_edit = Edit("emcid", "tiny", {te: Change("delta", shape, {"delta": torch.zeros(shape)})})
    with pytest.raises(InvalidInputError, match="changes the text encoder: connect the CLIP"):
        view.ModelView(model).apply(te_edit)
    with pytest.raises(InvalidInputError, match="connect the pruned student MODEL and the full teacher"):
        jobs.run("distill_unlearn", model, None, jobs.DistillJob(teacher=None), RunContext())
    with pytest.raises(InvalidInputError, match="carries no weight patches"):
        jobs.edit_between(model.clone(), model)
    same = model.clone()
    same.add_patches({FAM.attn2_kv_keys()[0]: (torch.zeros(FAM.expected_shapes()[FAM.attn2_kv_keys()[0]]),)})
    with pytest.raises(InvalidInputError, match="equal the original's"):
        jobs.edit_between(same, model)
    assert not model.patches


def _counting(monkeypatch, module, name, counts):
    real = getattr(module, name)

    def wrapped(*a, **k):
        counts[name] = counts.get(name, 0) + 1
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("method", ["uce", "concept_prune"])
def test_a_job_reads_the_model_once_and_leaves_it_unchanged(comfy, monkeypatch, method):
    model, clip = random_model("tiny", seed=3), random_clip(4)
    before = {k: v.clone() for k, v in model.model_state_dict().items()}
    counts: dict[str, int] = {}
    for name in ("original_weights", "model_family"):
        _counting(monkeypatch, view, name, counts)
        _counting(monkeypatch, patches, name, counts)
    if method == "uce":
        config = jobs.UCEJob(settings=UCEConfig(concepts=["red"], default_preserve=False, preserve=["blue"]))
    else:
        from conceptedit.editing.concept_prune.config import PruneConfig
        config = jobs.ConceptPruneJob(concepts=["circle"], preset="custom", pairs_text="a {concept} | a shape",
                                      settings=PruneConfig(**dict(TINY_DEFAULTS, steps=2, tau=1)))
    with torch.inference_mode():
        out = jobs.run(method, model, clip, config, RunContext())
    assert counts == {"original_weights": 1, "model_family": 1}, counts
    assert out.model is not model and out.model.patches and not model.patches and out.clip is clip
    assert out.edit.fingerprint == view.ModelView(model, clip).fingerprint
    assert out.edit.fingerprint["layout"] == arch.fingerprint(FAM, before)["layout"]
    for k, v in model.model_state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- weights under a low-VRAM load -----------------------------------------------------------------
def _load_lowvram(patcher, budget: int) -> None:
    """ComfyUI's partial load: modules past `budget` bytes stay unpatched and get their patches per
    forward (2024-03: patch_model_lowvram; current: patch_model(lowvram_model_memory=...))."""
    cpu = torch.device("cpu")
    if hasattr(patcher, "patch_model_lowvram"):
        patcher.patch_model_lowvram(cpu, budget)
    else:
        patcher.patch_model(cpu, lowvram_model_memory=budget)


def _weight_functions(patcher) -> int:
    return sum(1 for m in patcher.model.modules()
               if getattr(m, "weight_function", None) and getattr(m, "weight", None) is not None)


def _mixed_edit(model) -> Edit:
    shapes = FAM.expected_shapes()
    g = torch.Generator().manual_seed(5)
    changes = {k: Change("lowrank", shapes[k], {"up": torch.randn(shapes[k][0], 2, generator=g) * 0.05,
                                                 "down": torch.randn(2, shapes[k][1], generator=g) * 0.05})
               for k in FAM.attn2_kv_keys()}
    for k in FAM.ffn_out_keys():
        n = shapes[k][0] * shapes[k][1]
        changes[k] = Change("mask", shapes[k], {"index": torch.randperm(n, generator=g)[: n // 10].sort().values})
    return Edit("uce+concept_prune", "tiny", changes)


def test_weights_read_the_same_whatever_comfyui_has_loaded_where(comfy):
    """A low-VRAM load patches some modules in place and leaves the rest unpatched: the base weights
    a method reads (UCE, fingerprints, masks, exports) and the patched weights the audit reads must
    not depend on which is which."""
    import comfy.model_management as mm
    model = random_model("tiny", seed=6)
    base = {k: v.clone() for k, v in original_weights(model).items()}
    edit = _mixed_edit(model)
    keys = sorted(edit.changes)
    patched = apply_edit(model, None, Edit(edit.method, edit.family, {k: edit.changes[k] for k in keys}))[0]
    expected = {k: base[k].float() + edit.changes[k].delta(base[k].float(), dtype=torch.float32).reshape(base[k].shape)
                for k in keys}
    reference = patched_weights(patched, keys)
    for k in keys:
        torch.testing.assert_close(reference[k], expected[k], atol=1e-6, rtol=1e-5)

    size = sum(p.numel() * p.element_size() for p in patched.model.diffusion_model.parameters())
    mm.unload_all_models()
    _load_lowvram(patched, size // 2)
    try:
        assert _weight_functions(patched) > 0, "nothing was left to the low-VRAM path: the test tests nothing"
        assert patched.backup, "nothing was patched in place: the test tests nothing"
        for k, w in original_weights(patched).items():
            assert torch.equal(w, base[k]), f"{k}: the base weight read from a low-VRAM clone is not the original"
        again = patched_weights(patched, keys)
        for k in keys:
            assert torch.equal(again[k], reference[k]), k
        diff = jobs.edit_between(patched, model)
        assert set(diff.changes) == set(keys)
        for k in keys:
            torch.testing.assert_close(diff.changes[k].tensors["delta"], expected[k] - base[k].float(),
                                       atol=1e-6, rtol=1e-5)
        v = view.ModelView(patched)
        assert v.fingerprint == view.ModelView(model).fingerprint
    finally:
        patched.unpatch_model(torch.device("cpu"))
    for k, w in model.model_state_dict().items():
        assert torch.equal(w, base[k]), k


def test_masks_attached_as_fixed_hooks_resolve_against_the_base_weights():
    """A module whose weight is patched (a full load of a patched model) and one that is not (low
    VRAM) give the same fixed ΔW for a mask when the host says what the base weight is."""
    lin = torch.nn.Linear(4, 3, bias=False)
    base_w = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1
    with torch.no_grad():
        lin.weight.copy_(base_w * 2)  # as loaded with some other patch in place
    key = "diffusion_model.x.weight"
    mask = Edit("concept-prune", "tiny", {key: Change("mask", (3, 4), {"index": torch.tensor([0, 5, 11])})})
    d = edit_as_fixed([(mask, 1.0)], {"x": lin}, base={key: base_w})["x"]
    want = torch.zeros(12)
    want[[0, 5, 11]] = -base_w.reshape(-1)[[0, 5, 11]]
    assert torch.equal(d.reshape(-1), want)
    d_module = edit_as_fixed([(mask, 1.0)], {"x": lin})["x"]  # without: the module's own weight
    assert torch.equal(d_module.reshape(-1), 2 * want)


# ---- the shared formulas and the loop skeleton -----------------------------------------------------
def test_add_noise_is_the_ddpm_forward_process_and_predict_x0_inverts_it():
    ac = torch.linspace(0.999, 0.01, 1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 400, 999])
    xt = add_noise(x0, eps, t, ac)
    for i, ti in enumerate(t.tolist()):
        a = ac[ti]
        torch.testing.assert_close(xt[i], a.sqrt() * x0[i] + (1 - a).sqrt() * eps[i])
        torch.testing.assert_close(add_noise(x0[i:i + 1], eps[i:i + 1], ti, ac), xt[i:i + 1])
        torch.testing.assert_close(predict_x0(xt[i], eps[i], a), x0[i], atol=1e-4, rtol=1e-4)


def test_train_loop_records_runs_in_stretches_and_stops_on_nan_and_cancel():
    seen = []
    ctx = RunContext(progress=lambda d, t: seen.append((d, t)))
    log = train_loop(2, lambda i: {"loss": float(i), "pair": [i, 0.5], "none": None}, ctx, what="t", hint="h",
                     total=3)
    log = train_loop(1, lambda i: {"loss": float(i)}, ctx, what="t", hint="h", log=log, total=3)
    assert isinstance(log, TrainLog) and log.steps == 3 and log.history["loss"] == [0.0, 1.0, 2.0]
    assert log.history["pair"] == [[0, 0.5], [1, 0.5]] and log.history["none"] == [None, None]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(NonFiniteError, match=r"unlearning: 'retain' became NaN/Inf .* at step 1; lower lr"):
        train_loop(3, lambda i: {"retain": math.nan if i == 1 else 1.0}, RunContext(), what="unlearning",
                   hint="lower lr")
    steps = []
    stop = RunContext(should_stop=lambda: len(steps) >= 2)
    with pytest.raises(Cancelled):
        train_loop(5, lambda i: steps.append(i) or {}, stop, what="t", hint="h")
    assert steps == [0, 1]

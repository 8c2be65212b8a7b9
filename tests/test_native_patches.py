"""Edits reach ComfyUI in its own patch form: low-rank changes as LoRA patches made by ComfyUI's own
loader (comfy.lora.load_lora; never expanded to a dense ΔW), dense deltas in float32 whatever the
weight's dtype, masks as sparse diffs. Loaded, the LoRA-form model equals the dense result."""
import pytest
import torch

from conceptedit.comfy_host.patches import edit_patches, model_fingerprint, original_weights
from conceptedit.comfy_host.view import apply_edit
from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from helpers import random_clip, random_model

FAM = arch.get_family("tiny")
TE = FAM.text_encoders[0]


def _lowrank(shape, rank, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return Change("lowrank", shape, {"up": torch.randn(shape[0], rank, generator=g) * scale,
                                     "down": torch.randn(rank, shape[1], generator=g) * scale})


def _unet_edit(model, rank=4):
    shapes = FAM.expected_shapes()
    return Edit("uce", "tiny", {k: _lowrank(shapes[k], rank, i) for i, k in enumerate(FAM.attn2_kv_keys())},
                fingerprint=model_fingerprint(model))


def _te_edit():
    shapes = FAM.expected_shapes()
    return Edit("emcid", "tiny", {k: _lowrank(shapes[k], 2, 100 + i) for i, k in enumerate(FAM.te_fc2_keys())})


def _dense(edit):
    return Edit(edit.method, edit.family, {k: Change("delta", c.shape, {"delta": c.delta(dtype=torch.float32)})
                                           for k, c in edit.changes.items()}, fingerprint=edit.fingerprint)


def _tensors(patch):
    """Every tensor a patch holds (a tuple in the 2024 copy, a weight_adapter object in current ComfyUI)."""
    if isinstance(patch, torch.Tensor):
        return [patch]
    if isinstance(patch, (tuple, list)):
        return [t for p in patch for t in _tensors(p)]
    if hasattr(patch, "weights"):
        return _tensors(patch.weights)
    return []


def _is_lora(patch):
    return patch[0] == "lora" if isinstance(patch, tuple) else type(patch).__name__ == "LoRAAdapter"


def _loaded(patcher):
    """The weights ComfyUI computes when it loads the model for sampling (patches merged)."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    out = {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}
    mm.unload_all_models()
    return out


def _rel(a, b, base):
    return float((a.double() - b.double()).norm() / (b.double() - base.double()).norm())


@torch.inference_mode()
def test_lowrank_edits_are_lora_patches_and_load_to_the_dense_result(comfy):
    model, clip = random_model(seed=2), random_clip()
    edit, te_edit = _unet_edit(model), _te_edit()
    base_u, base_t = _loaded(model), _loaded(clip.patcher)
    m_lora, _, _ = apply_edit(model, None, edit)
    m_dense, _, _ = apply_edit(model, None, _dense(edit))
    _, c_lora, _ = apply_edit(model, clip, te_edit)
    _, c_dense, _ = apply_edit(model, clip, _dense(te_edit))
    for patcher, e in ((m_lora, edit), (c_lora.patcher, te_edit)):
        assert set(patcher.patches) == set(e.changes)
        for k, c in e.changes.items():
            (patch,) = [p[1] for p in patcher.patches[k]]
            assert _is_lora(patch), type(patch)
            held = sum(t.numel() for t in _tensors(patch))
            assert held == c.tensors["up"].numel() + c.tensors["down"].numel() < c.delta().numel()
    for k, p in m_dense.patches.items():
        assert [t.dtype for t in _tensors(p[0][1])] == [torch.float32]
    lora_u, dense_u = _loaded(m_lora), _loaded(m_dense)
    lora_t, dense_t = _loaded(c_lora.patcher), _loaded(c_dense.patcher)
    for k, c in edit.changes.items():
        assert _rel(lora_u[k], dense_u[k], base_u[k]) <= 1e-5, k
        assert _rel(lora_u[k], base_u[k] + c.delta(), base_u[k]) <= 1e-5, k
    for k in te_edit.changes:
        assert _rel(lora_t[k], dense_t[k], base_t[k]) <= 1e-5, k
    untouched = [k for k in base_u if k not in edit.changes]
    assert untouched and all(torch.equal(lora_u[k], base_u[k]) for k in untouched)
    assert all(torch.equal(lora_t[k], base_t[k]) for k in base_t if k not in te_edit.changes)
    # the inputs are unchanged
    assert model.patches == {} and clip.patcher.patches == {}
    assert all(torch.equal(v, base_u[k]) for k, v in _loaded(model).items())


@torch.inference_mode()
def test_strength_zero_is_the_identity_and_strength_scales(comfy):
    model, clip = random_model(seed=5), random_clip()
    edit, te_edit = _unet_edit(model), _te_edit()
    base_u, base_t = _loaded(model), _loaded(clip.patcher)
    m0, _, _ = apply_edit(model, None, edit, 0.0)
    _, c0, _ = apply_edit(model, clip, te_edit, 0.0)
    assert all(torch.equal(v, base_u[k]) for k, v in _loaded(m0).items())
    assert all(torch.equal(v, base_t[k]) for k, v in _loaded(c0.patcher).items())
    half, _, _ = apply_edit(model, None, edit, 0.5)
    got = _loaded(half)
    for k, c in edit.changes.items():
        assert _rel(got[k], base_u[k] + 0.5 * c.delta(), base_u[k]) <= 1e-5, k


@torch.inference_mode()
def test_dense_deltas_stay_float32_on_a_half_precision_model(comfy):
    model = random_model(seed=6)
    model.model.diffusion_model.half()
    k = FAM.attn2_kv_keys()[0]
    shape = FAM.expected_shapes()[k]
    d = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    edit = Edit("uce", "tiny", {k: Change("delta", shape, {"delta": d})})
    base = _loaded(model)[k]
    m2, _, _ = apply_edit(model, None, edit)
    (patch,) = [p[1] for p in m2.patches[k]]
    assert [t.dtype for t in _tensors(patch)] == [torch.float32]
    # ComfyUI adds in float32 and rounds the sum once (a delta cast to fp16 first would round twice)
    assert torch.equal(_loaded(m2)[k], (base.float() + d).half())


def test_patches_come_from_comfyuis_own_lora_loader(comfy, monkeypatch):
    import comfy.lora
    model = random_model(seed=8)
    edit = _unet_edit(model, rank=3)
    seen = []
    real = comfy.lora.load_lora

    def spy(sd, key_map, *a, **k):
        seen.append((set(sd), dict(key_map)))
        return real(sd, key_map, *a, **k)
    monkeypatch.setattr(comfy.lora, "load_lora", spy)
    patches = edit_patches(edit, original_weights(model))
    (keys, key_map), = seen
    assert set(key_map.values()) == set(edit.changes) == set(patches)
    assert all(keys >= {f"{n}.lora_up.weight", f"{n}.lora_down.weight", f"{n}.alpha"} for n in key_map)


@torch.inference_mode()
def test_quantized_weights_are_refused_with_nothing_applied(comfy):
    """Integer storage with no scale the pack can read (not float8, scaled fp8, a QuantizedTensor or
    GGUF, which tests/test_quantized.py applies) cannot take an exact edit: refused by name."""
    model = random_model(seed=9)
    kk = FAM.attn2_kv_keys()[0]
    mod = dict(model.model.diffusion_model.named_modules())[kk[len("diffusion_model."):-len(".weight")]]
    mod.weight = torch.nn.Parameter(torch.zeros(mod.weight.shape, dtype=torch.uint8), requires_grad=False)
    edit = Edit("uce", "tiny", {kk: _lowrank(FAM.expected_shapes()[kk], 2, 0)})
    with pytest.raises(InvalidInputError, match="quantized"):
        apply_edit(model, None, edit)
    assert model.patches == {}


def _forward_state(patcher):
    """What decides the per-step work of a loaded model: each module's class, weight layout, per-forward
    weight functions, cast flag and hooks, and the sampling wrappers in model_options."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    state = {}
    for name, m in patcher.model.diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        state[name] = (type(m).__name__,
                       None if not isinstance(w, torch.Tensor) else (w.dtype, tuple(w.shape), w.stride(), w.device.type),
                       len(getattr(m, "weight_function", []) or []), len(getattr(m, "bias_function", []) or []),
                       bool(getattr(m, "comfy_cast_weights", False)), len(m._forward_hooks), len(m._forward_pre_hooks))
    options = patcher.model_options
    wrappers = (sorted(options.get("transformer_options", {}).get("patches", {})), "model_function_wrapper" in options,
                sorted(options.get("transformer_options", {}).get("wrappers", {}) or {}))
    return state, wrappers


@torch.inference_mode()
def test_a_loaded_patched_model_runs_the_originals_operations(comfy):
    """Patches merge into the weights when ComfyUI loads the model, so a patched model samples as fast
    as the original: the same modules, weight layouts, no per-forward weight function, cast or hook,
    no sampling wrapper (bench_apply --speed measures the time itself)."""
    model = random_model(seed=3)
    shapes = FAM.expected_shapes()
    mask = Edit("concept_prune", "tiny", {k: Change("mask", shapes[k], {"index": torch.tensor([1, 5, 9])})
                                          for k in FAM.ffn_out_keys()[:2]}, fingerprint=model_fingerprint(model))
    base = _loaded(model)
    original = _forward_state(model)
    for edit in (_unet_edit(model), mask):
        patched, _, _ = apply_edit(model, None, edit)
        state = _forward_state(patched)  # loaded: the patches are merged now
        merged = patched.model_state_dict()
        assert all(not torch.equal(merged[k], base[k]) for k in edit.changes), "the patches did not merge"
        assert state == original, edit.method
    import comfy.model_management as mm
    mm.unload_all_models()

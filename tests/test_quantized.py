"""Models stored quantized, as ComfyUI loads them: float8 (weight_dtype fp8_e4m3fn, manual cast),
scaled fp8, ComfyUI's own QuantizedTensor (0.3.7x), and GGUF blocks. Methods compute from the exact
dequantized weights; edits go on as LoRA-like patches that ComfyUI rounds back to the stored type,
and `ModelView.apply` reports how much of the edit that rounding loses."""
from __future__ import annotations

import re

import pytest
import torch

from conceptedit.comfy_host import jobs
from conceptedit.comfy_host.patches import original_weights
from conceptedit.comfy_host.quantized import (FloatWeights, dequantized, restored, rounding_error, rounding_per_layer,
                                              rounding_summary, stored_type)
from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.hosts import RunContext
from conceptedit.editing.uce.config import UCEConfig
from test_layout_matrix import _node

FP8 = torch.float8_e4m3fn
FAM = arch.get_family("tiny")


# ---- models as ComfyUI's loader builds them ---------------------------------------------------------
def _tiny(weight_dtype: torch.dtype | None = None, scaled: bool = False, quantized_layers: tuple[str, ...] = ()):
    """(MODEL, CLIP) of the bundled tiny model with its diffusion model stored as comfy/sd.py's
    `load_diffusion_model_state_dict` stores it: `weight_dtype` with the manual cast ComfyUI picks
    (`unet_manual_cast`), a scaled-fp8 checkpoint (`scaled_fp8` marker, `scale_weight` per Linear),
    or a mixed-precision checkpoint whose `quantized_layers` are float8 QuantizedTensors
    (`layer_quant_config` from its `_quantization_metadata`)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    from conceptedit.tiny import comfy_model as cm
    from conceptedit.tiny import model as tm

    _, clip, _ = cm.load_tiny()
    unet_sd, _, _ = tm.read_weights(None)
    config = cm._classes()["TinySD"](tm.unet_config())
    device = mm.get_torch_device()
    if scaled:
        config.scaled_fp8 = FP8
        unet_sd = _scaled_fp8_checkpoint(unet_sd)
        config.set_inference_dtype(torch.float32, None)
    elif quantized_layers:
        config.layer_quant_config = {n: {"format": "float8_e4m3fn"} for n in quantized_layers}
        unet_sd = _quantized_checkpoint(unet_sd, quantized_layers)
        config.set_inference_dtype(torch.float32, mm.unet_manual_cast(None, device, config.supported_inference_dtypes))
    else:
        dtype = weight_dtype or torch.float32
        config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, device, config.supported_inference_dtypes))
    with torch.no_grad():
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
        base.load_model_weights({f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}, "model.diffusion_model.")
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=mm.unet_offload_device())
    return model, clip


def _linear_names(sd: dict) -> list[str]:
    return [k[:-len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]


def _scaled_fp8_checkpoint(sd: dict) -> dict:
    """A scaled-fp8 checkpoint's UNet: every Linear weight as float8 of W/s with s = max|W|/448 beside it."""
    out = dict(sd)
    for name in _linear_names(sd):
        w = sd[f"{name}.weight"]
        s = w.abs().max() / torch.finfo(FP8).max
        out[f"{name}.weight"] = (w / s).to(FP8)
        out[f"{name}.scale_weight"] = s.reshape(()).float()
    return out


def _quantized_checkpoint(sd: dict, layers: tuple[str, ...]) -> dict:
    """A mixed-precision checkpoint's UNet: the named layers' weights as ComfyUI's float8 layout stores
    them (the float8 data and its `weight_scale`), quantized by that layout itself."""
    from comfy.quant_ops import TensorCoreFP8Layout
    out = dict(sd)
    for name in layers:
        q, params = TensorCoreFP8Layout.quantize(sd[f"{name}.weight"], dtype=FP8)
        out[f"{name}.weight"], out[f"{name}.weight_scale"] = q, params["scale"]
    return out


def _bits(patcher) -> dict[str, bytes]:
    """Every stored tensor's bytes with nothing loaded (a loaded clone patches the shared module in
    place), as bytes: float8 has no torch.equal on the CPU; a QuantizedTensor by its value."""
    import comfy.model_management as mm
    mm.unload_all_models()
    out = {}
    for k, v in patcher.model_state_dict().items():
        plain = v.dequantize() if type(v).__name__ == "QuantizedTensor" else v
        out[k] = plain.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return out


def _loaded(patcher) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes with once it loaded the model for sampling (patches merged), as float32."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    out = {k: dequantized(v) for k, v in patcher.model_state_dict().items() if k.startswith("diffusion_model.")}
    mm.unload_all_models()
    return out


def _fp8_step(x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The float8_e4m3fn spacing at |x| (3 mantissa bits; subnormal below 2⁻⁶), times the scale."""
    e = torch.floor(torch.log2((x / scale).abs().clamp_min(2.0 ** -6)))
    return 2.0 ** (e - 3) * scale


def _within_a_step(got: torch.Tensor, target: torch.Tensor, scale: float | torch.Tensor = 1.0) -> bool:
    """`got` is `target` rounded to a float8 neighbour: at most one step away. ComfyUI 0.3.x rounds
    stochastically from a float16 copy of the value and takes its exponent from a float16 log2, so
    a value just under a power of two may land on the coarser grid above it: one step of that grid."""
    step = _fp8_step(target * (1 + 2.0 ** -8), scale)
    return bool(((got - target).abs() <= step * 1.001 + target.abs() * 2.0 ** -10).all())


def _sample_one_step(comfy, model, clip):
    pos = comfy.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = comfy.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy.EmptyLatentImage().generate(64, 64, 1)[0]
    out = comfy.common_ksampler(model, 0, 1, 2.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert torch.isfinite(out).all()
    return out


def _uce(model, clip) -> jobs.JobResult:
    config = UCEConfig(concepts=["red"], default_preserve=False, preserve=["blue", "a circle"])
    return jobs.run("uce", model, clip, jobs.UCEJob(settings=config), RunContext())


def _report_numbers(warnings: list[str]) -> tuple[float, float, int]:
    line = next(w for w in warnings if "rounding error" in w)
    m = re.search(r"= ([0-9.]+) mean, ([0-9.]+) max over (\d+) edited layers", line)
    return float(m.group(1)), float(m.group(2)), int(m.group(3))


def _quant_ops_or_skip():
    try:
        import comfy.quant_ops  # noqa: F401
    except ImportError:
        pytest.skip("this ComfyUI has no comfy.quant_ops (QuantizedTensor came with 0.3.7x; the 2024-03 copy predates it)")


# ---- (a) the closed form on a float8 model -----------------------------------------------------------
@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_uce_on_a_float8_model_applies_the_float_edit_rounded_and_reports_the_rounding(comfy):
    model, clip = _tiny(FP8)
    stored = model.model_state_dict()
    keys = FAM.attn2_kv_keys()
    assert all(stored[k].dtype == FP8 for k in keys)
    before = _bits(model)
    out = _uce(model, clip)
    edit = out.edit
    assert set(edit.changes) == set(keys) == set(out.model.patches) and not model.patches

    # the edit is the float solve on the stored weights read exactly: W (float8 -> float32) + ΔW
    target = {k: stored[k].float() + edit.changes[k].delta(dtype=torch.float32) for k in keys}
    got = _loaded(out.model)
    measured = []
    for k in keys:
        # ComfyUI rounds W + ΔW back to float8: to a neighbour (stochastically in 0.3.x, nearest in 2024)
        assert _within_a_step(got[k], target[k]), k
        delta = target[k] - stored[k].float()
        measured.append(float((got[k] - target[k]).norm() / delta.norm()))

    mean, worst, n = _report_numbers(out.warnings)
    layers = rounding_per_layer(edit, 1.0, (original_weights(model),))
    assert n == len(keys) == len(layers) and all(r.stored == "float8_e4m3fn" for r in layers)
    assert mean == pytest.approx(sum(r.error for r in layers) / n, abs=1e-3)
    assert worst == pytest.approx(max(r.error for r in layers), abs=1e-3)
    # what ComfyUI's own rounding lost, against the nearest-rounding report (stochastic: about √2 ×)
    ratio = (sum(measured) / n) / mean
    assert 0.8 < ratio < 2.0, ratio

    _sample_one_step(comfy, out.model, clip)
    assert _bits(model) == before and not model.patches


@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_every_kind_of_change_applies_to_float8_masks_zero_exactly_and_strength_0_is_the_identity(comfy):
    model, _ = _tiny(FP8)
    base = _loaded(model)
    kk, kf = FAM.attn2_kv_keys()[0], FAM.ffn_out_keys()[0]
    shapes = FAM.expected_shapes()
    g = torch.Generator().manual_seed(0)
    low = Change("lowrank", shapes[kk], {"up": torch.randn(shapes[kk][0], 2, generator=g) * 0.1,
                                         "down": torch.randn(2, shapes[kk][1], generator=g) * 0.1})
    index = torch.arange(0, shapes[kf][0] * shapes[kf][1], 7)
    mask = Change("mask", shapes[kf], {"index": index})
    kd = FAM.attn2_kv_keys()[1]
    dense = Change("delta", shapes[kd], {"delta": torch.randn(shapes[kd], generator=g) * 0.05})
    edit = Edit("uce+concept_prune", "tiny", {kk: low, kd: dense, kf: mask})
    from conceptedit.comfy_host.view import apply_edit
    patched, _, warnings = apply_edit(model, None, edit)
    zero, _, _ = apply_edit(model, None, edit, 0.0)
    got = _loaded(patched)
    pruned = mask.mask().reshape(-1)
    kept, kept_base = got[kf].reshape(-1)[~pruned], base[kf].reshape(-1)[~pruned]
    assert bool((got[kf].reshape(-1)[pruned] == 0).all())
    # the rest of the layer is rounded again: the 2024 copy rounds to nearest (unchanged); 0.3.x rounds
    # stochastically from float16, which moves a few exact values by one step
    assert _within_a_step(kept, kept_base) and float((kept == kept_base).float().mean()) > 0.99
    for k in (kk, kd):
        assert _within_a_step(got[k], base[k] + edit.changes[k].delta(dtype=torch.float32)), k
    assert any("float8_e4m3fn" in w and "over 3 edited layers" in w for w in warnings)
    assert all(torch.equal(v, base[k]) for k, v in _loaded(zero).items())
    assert not model.patches


# ---- (b) unlearning on a float8 model --------------------------------------------------------------------
@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_unlearning_trains_a_float32_lora_on_a_float8_model_and_applies_it(comfy):
    model, clip = _tiny(FP8)
    before = _bits(model)
    out, edit, _plot = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", method="rgd",
                             steps=2, rank=2, batch=2, n_prompts=2, gen_steps=2, width=64, height=64)
    assert edit.changes and set(out.patches) == set(edit.changes)
    for c in edit.changes.values():
        assert c.kind == "lowrank" and c.tensors["up"].dtype == c.tensors["down"].dtype == torch.float32
    stored = model.model_state_dict()
    got = _loaded(out)
    for k, c in edit.changes.items():
        assert _within_a_step(got[k], stored[k].float() + c.delta(dtype=torch.float32)), k
    # two steps of training move the weights by much less than a float8 step: the report says the
    # edit is mostly lost in rounding and what to load instead
    lines = rounding_summary(rounding_per_layer(edit, 1.0, (original_weights(model),)))
    assert len(lines) == 2 and "most of the edit is lost" in lines[1] and "bf16/fp16" in lines[1]
    _sample_one_step(comfy, out, clip)
    assert _bits(model) == before and not model.patches


# ---- scaled fp8 (current ComfyUI) ----------------------------------------------------------------------
@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_uce_on_a_scaled_fp8_model_reads_q_times_scale_and_rounds_back_through_the_scale(comfy):
    import comfy.ops as comfy_ops
    if not hasattr(comfy_ops, "scaled_fp8_ops"):
        pytest.skip("this ComfyUI has no scaled-fp8 ops (added in late 2024; the 2024-03 copy predates them)")
    model, clip = _tiny(scaled=True)
    stored = model.model_state_dict()
    keys = FAM.attn2_kv_keys()
    scale = {k: stored[k[:-len("weight")] + "scale_weight"] for k in keys}
    w = original_weights(model)
    assert all(torch.equal(w[k], stored[k].float() * scale[k]) for k in keys)
    assert w.stored_type(keys[0]) == "scaled float8_e4m3fn"
    before = _bits(model)
    out = _uce(model, clip)
    got = _loaded(out.model)
    clipped = 0
    for k in keys:
        target = w[k] + out.edit.changes[k].delta(dtype=torch.float32)
        # the loaded model's weight is q' (float8) with the layer's scale kept: read back q' · s; what
        # the edit grew past 448 · s is clipped there
        limit = torch.finfo(FP8).max * scale[k]
        inside = target.abs() <= limit
        assert _within_a_step((got[k] * scale[k])[inside], target[inside], scale[k]), k
        assert torch.equal(got[k][~inside], torch.finfo(FP8).max * target[~inside].sign()), k
        clipped += int((~inside).sum())
    mean, worst, n = _report_numbers(out.warnings)
    assert n == len(keys) and 0 < mean <= worst
    assert clipped == 0 or any(f"{clipped} edited values" in x and "clipped" in x for x in out.warnings)
    _sample_one_step(comfy, out.model, clip)
    assert _bits(model) == before


# ---- (c) ComfyUI's QuantizedTensor --------------------------------------------------------------------
@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_uce_on_a_quantized_tensor_model_requantizes_the_edited_weights(comfy):
    _quant_ops_or_skip()
    from comfy.quant_ops import QuantizedTensor
    keys = FAM.attn2_kv_keys()
    layers = tuple(k[len("diffusion_model."):-len(".weight")] for k in keys)
    model, clip = _tiny(quantized_layers=layers)
    stored = model.model_state_dict()
    assert all(isinstance(stored[k], QuantizedTensor) for k in keys)
    w = original_weights(model)
    assert all(torch.equal(w[k], stored[k].dequantize().float()) for k in keys)
    assert w.stored_type(keys[0]) == "QuantizedTensor TensorCoreFP8Layout (float8_e4m3fn)"
    before = _bits(model)
    out = _uce(model, clip)
    import comfy.model_management as mm
    mm.load_models_gpu([out.model])
    live = out.model.model_state_dict()
    assert all(isinstance(live[k], QuantizedTensor) for k in keys)
    got = {k: live[k].dequantize().float() for k in keys}
    mm.unload_all_models()
    for k in keys:
        target = w[k] + out.edit.changes[k].delta(dtype=torch.float32)
        s = target.abs().max() / torch.finfo(FP8).max  # ComfyUI re-quantizes with a fresh per-tensor scale
        assert _within_a_step(got[k], target, s), k
    mean, worst, n = _report_numbers(out.warnings)
    assert n == len(keys) and 0 < mean <= worst
    assert "QuantizedTensor TensorCoreFP8Layout" in next(x for x in out.warnings if "rounding" in x)
    _sample_one_step(comfy, out.model, clip)
    assert _bits(model) == before and not model.patches


@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_unlearning_finds_and_trains_the_linears_of_a_quantized_tensor_model(comfy):
    """ComfyUI's mixed-precision Linear is no torch.nn.Linear subclass; its quantized weights must stay
    readable after training (the model is loaded in inference mode before the training job starts)."""
    _quant_ops_or_skip()
    keys = FAM.attn2_kv_keys()
    model, clip = _tiny(quantized_layers=tuple(k[len("diffusion_model."):-len(".weight")] for k in keys))
    before = _bits(model)
    out, edit, _plot = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", method="rgd",
                             steps=2, rank=2, batch=2, n_prompts=2, gen_steps=2, width=64, height=64)
    assert set(keys) <= set(edit.changes) and set(out.patches) == set(edit.changes)
    _sample_one_step(comfy, out, clip)
    assert _bits(model) == before and not model.patches


# ---- the rounding report, by hand ----------------------------------------------------------------------
def test_the_rounding_report_equals_a_hand_computation_on_one_layer(comfy):
    g = torch.Generator().manual_seed(3)
    k = FAM.attn2_kv_keys()[0]
    shape = FAM.expected_shapes()[k]
    w8 = (torch.randn(shape, generator=g) * 0.2).to(FP8)
    up, down = torch.randn(shape[0], 2, generator=g) * 0.3, torch.randn(2, shape[1], generator=g) * 0.3
    edit = Edit("uce", "tiny", {k: Change("lowrank", shape, {"up": up, "down": down})})
    W, d = w8.double(), (up @ down).double()
    hand = float(((W + d).float().to(FP8).double() - (W + d)).norm() / d.norm())
    assert rounding_error(w8, w8.float(), (up @ down)) == pytest.approx(hand, rel=1e-6)
    layers = rounding_per_layer(edit, 1.0, (FloatWeights({k: w8}),))
    assert [(r.key, r.stored) for r in layers] == [(k, "float8_e4m3fn")]
    assert layers[0].error == pytest.approx(hand, rel=1e-6)
    (line,) = rounding_summary(layers)
    assert f"= {hand:.3f} mean, {hand:.3f} max over 1 edited layers" in line and "round-to-nearest" in line
    # at half the strength the same rule with ΔW/2
    half = float(((W + d / 2).float().to(FP8).double() - (W + d / 2)).norm() / (d / 2).norm())
    assert rounding_per_layer(edit, 0.5, (FloatWeights({k: w8}),))[0].error == pytest.approx(half, rel=1e-6)
    # scaled fp8: stored q with W = q·s, rounded back as round((W + ΔW)/s)·s
    s = torch.tensor(0.01)
    q = (W.float() / s).to(FP8)
    Ws = q.double() * s.double()
    hand_s = float(((((Ws + d) / s.double()).float().to(FP8).double() * s.double()) - (Ws + d)).norm() / d.norm())
    scaled = FloatWeights({k: q, k[:-len("weight")] + "scale_weight": s})
    (r,) = rounding_per_layer(edit, 1.0, (scaled,))
    assert r.stored == "scaled float8_e4m3fn" and r.error == pytest.approx(hand_s, rel=1e-5)
    # a tiny edit on large weights is mostly lost: the loud warning says what to load
    tiny = Edit("uce", "tiny", {k: Change("lowrank", shape, {"up": up * 1e-2, "down": down})})
    lines = rounding_summary(rounding_per_layer(tiny, 1.0, (FloatWeights({k: w8}),)))
    assert len(lines) == 2 and "most of the edit is lost" in lines[1] and "bf16/fp16" in lines[1]
    # float weights are not reported; strength 0 reports nothing
    assert rounding_per_layer(edit, 1.0, (FloatWeights({k: w8.float()}),)) == []
    assert rounding_per_layer(edit, 0.0, (FloatWeights({k: w8}),)) == []


def test_restoring_a_float8_weight_clamps_to_its_range_as_comfyui_does(comfy):
    w8 = torch.tensor([[440.0, -440.0, 1.0]]).to(FP8)
    back = restored(w8, torch.tensor([[500.0, -1000.0, 1.0]]))
    assert back.tolist() == [[448.0, -448.0, 1.0]]


# ---- (d) GGUF -------------------------------------------------------------------------------------------
def _gguf_tensor(values: torch.Tensor, qtype_name: str) -> torch.Tensor:
    """`values` quantized by the `gguf` package into the packed bytes a GGUF file holds, carried as
    ComfyUI-GGUF's loader carries them: a uint8 tensor of the file's rows with `tensor_type` and
    `tensor_shape` (its GGMLTensor class itself is ComfyUI-GGUF's code, not available here)."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (requirements-dev.txt) reads GGUF blocks")
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    raw = torch.from_numpy(gguf.quants.quantize(values.numpy(), qtype))
    raw.tensor_type, raw.tensor_shape = qtype, torch.Size(values.shape)
    return raw


def _q8_0_by_hand(raw: torch.Tensor, shape) -> torch.Tensor:
    """GGML's Q8_0 layout read directly: blocks of 34 bytes, a float16 scale d then 32 int8 q; x = d·q."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(shape)


def test_gguf_blocks_dequantize_exactly(comfy):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g) * 0.1
    q8 = _gguf_tensor(w, "Q8_0")
    assert stored_type(q8) == "GGUF Q8_0" and q8.dtype == torch.uint8 and tuple(q8.shape) != (64, 96)
    exact = _q8_0_by_hand(q8, (64, 96))
    assert torch.equal(dequantized(q8), exact)
    assert float((exact - w).abs().max()) <= float(w.abs().max()) / 127  # half a step of the block's scale, at most
    for name, tol in (("Q4_0", 0.1), ("Q5_1", 0.05), ("BF16", 1e-2)):
        t = _gguf_tensor(w, name)
        got = dequantized(t)
        assert got.shape == (64, 96) and got.dtype == torch.float32
        assert float((got - w).abs().max()) <= tol * float(w.abs().max()), name
    # FloatWeights: the logical shape without reading, the float value on read, the bytes kept for applying
    fw = FloatWeights({"x.weight": q8})
    assert fw.shapes() == {"x.weight": (64, 96)} and torch.equal(fw["x.weight"], exact) and fw.stored["x.weight"] is q8
    # GGUF weights are patched at each forward, never rounded back: the report says so, error 0
    k = "x.weight"
    edit = Edit("uce", "tiny", {k: Change("delta", (64, 96), {"delta": torch.ones(64, 96) * 1e-3})})
    (r,) = rounding_per_layer(edit, 1.0, (fw,))
    assert r.per_forward and r.error == 0.0
    assert "nothing is rounded back" in rounding_summary([r])[0]


def test_weights_with_no_exact_read_are_refused_by_name(comfy):
    with pytest.raises(InvalidInputError, match=r"int8 \(integer\).*load the float checkpoint"):
        dequantized(torch.zeros(4, 4, dtype=torch.int8))


def _comfyui_gguf():
    """ComfyUI-GGUF's `ops` and `nodes` modules from the checkout CONCEPTEDIT_COMFYUI_GGUF names (it is
    a custom node, not a PyPI package: CI has none, so this test skips there)."""
    import importlib.util
    import os
    import sys

    path = os.environ.get("CONCEPTEDIT_COMFYUI_GGUF")
    if not path or not os.path.isfile(os.path.join(path, "ops.py")):
        pytest.skip("set CONCEPTEDIT_COMFYUI_GGUF to a ComfyUI-GGUF checkout to run the GGUF host test "
                    "(its GGMLTensor and GGUFModelPatcher are that custom node's code)")
    pytest.importorskip("gguf", reason="ComfyUI-GGUF needs the gguf package")
    name = "conceptedit_test_comfyui_gguf"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as e:  # ComfyUI-GGUF follows current ComfyUI (comfy.float, 2024-08 on)
            for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[m]
            pytest.skip(f"this ComfyUI-GGUF does not load in this ComfyUI: {e}")
    return sys.modules[f"{name}.ops"], sys.modules[f"{name}.nodes"]


@torch.inference_mode()
def test_a_uce_edit_on_comfyui_ggufs_own_model_is_added_at_each_forward(comfy):
    """The real host: ComfyUI-GGUF's GGMLOps layers holding Q8_0 GGMLTensors (as its loader builds
    them) under its GGUFModelPatcher. The edit is solved on the exact dequantized weights and rides on
    the packed weight as patches that its layers add at every forward."""
    import comfy.model_management as mm
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    from conceptedit.comfy_host.patches import add_edit_patches
    from conceptedit.comfy_host.text import ComfyText
    from conceptedit.editing.concept_prune.prune import compute_concept_prune
    from conceptedit.editing.concept_prune.config import PruneConfig
    from conceptedit.editing.prompts import TINY_DEFAULTS
    from conceptedit.editing.uce.closed_form import compute_uce

    model, clip, nodes = _gguf_tiny()
    keys = FAM.attn2_kv_keys()
    w = original_weights(model)
    assert w.stored_type(keys[0]) == "GGUF Q8_0" and w.shapes()[keys[0]] == FAM.expected_shapes()[keys[0]]
    edit = compute_uce(ComfyText(clip), w, FAM, UCEConfig(concepts=["red"], default_preserve=False, preserve=["blue"]))
    patched, _ = add_edit_patches(model, None, edit, w, {})
    assert isinstance(patched, nodes.GGUFModelPatcher) and set(patched.patches) == set(keys) and not model.patches
    mm.load_models_gpu([patched])
    modules = dict(patched.model.diffusion_model.named_modules())
    for k in keys:
        layer = modules[k[len("diffusion_model."):-len(".weight")]]
        assert layer.weight.patches, k  # carried by the packed weight, added per forward
        running = layer.get_weight(layer.weight, torch.float32)
        target = w[k] + edit.changes[k].delta(dtype=torch.float32)
        # ComfyUI-GGUF dequantizes Q8_0 in float16 (d·q): within a float16 step of the exact value
        assert float((running - target).abs().max()) <= 2.0 ** -10 * float(target.abs().max()), k
    lines = rounding_summary(rounding_per_layer(edit, 1.0, (w,)))
    assert len(lines) == 1 and "nothing is rounded back" in lines[0]
    _sample_one_step(comfy, patched, clip)
    mm.unload_all_models()
    assert all(not getattr(p, "patches", []) for p in model.model.parameters())

    # ConceptPrune scores the packed layers through the host's exact read; its mask (−W⊙M, W read
    # exactly) cancels ComfyUI-GGUF's own float16 dequantization to within float16 rounding
    denoiser = ComfyDenoiser(model, ComfyText(clip), family=FAM, latent_hw=8, base=lambda: w)
    masks = compute_concept_prune(denoiser, FAM, {"red": [("a red circle", "a circle")]},
                                  PruneConfig(**dict(TINY_DEFAULTS, steps=2, tau=1)))
    pruned, _ = add_edit_patches(model, None, masks, w, {})
    mm.load_models_gpu([pruned])
    modules = dict(pruned.model.diffusion_model.named_modules())
    for k, change in masks.changes.items():
        layer = modules[k[len("diffusion_model."):-len(".weight")]]
        running, m = layer.get_weight(layer.weight, torch.float32), change.mask()
        assert bool((running[m].abs() <= 2.0 ** -10 * w[k][m].abs()).all()), k
        assert float((running[~m] - w[k][~m]).abs().max()) <= 2.0 ** -10 * float(w[k].abs().max()), k
    mm.unload_all_models()


def _gguf_tiny():
    """(MODEL, CLIP, ComfyUI-GGUF's nodes module): the tiny model as ComfyUI-GGUF's loader builds a
    GGUF diffusion model: GGMLOps layers holding Q8_0 GGMLTensors (F32 where a row is not a whole
    number of Q8_0 blocks) under its GGUFModelPatcher."""
    import comfy.model_management as mm
    import gguf
    from comfy import model_base, model_patcher
    from conceptedit.tiny import comfy_model as cm
    from conceptedit.tiny import model as tm

    ops, nodes = _comfyui_gguf()
    q8 = gguf.GGMLQuantizationType.Q8_0
    _, clip, _ = cm.load_tiny()
    unet_sd, _, _ = tm.read_weights(None)
    sd = {}
    for k, v in unet_sd.items():
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            sd[k] = ops.GGMLTensor(torch.from_numpy(gguf.quants.quantize(v.numpy(), q8)), tensor_type=q8,
                                   tensor_shape=v.shape)
        else:
            sd[k] = ops.GGMLTensor(v.clone(), tensor_type=gguf.GGMLQuantizationType.F32, tensor_shape=v.shape)
    config = cm._classes()["TinySD"](tm.unet_config())
    config.custom_operations = ops.GGMLOps()
    config.set_inference_dtype(torch.float32, None)
    base = model_base.BaseModel(config, model_type=model_base.ModelType.EPS, device="cpu")
    base.load_model_weights({f"model.diffusion_model.{k}": v for k, v in sd.items()}, "model.diffusion_model.")
    plain = model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    return nodes.GGUFModelPatcher.clone(plain), clip, nodes


@torch.inference_mode()  # as ComfyUI's executor runs every node
def test_unlearning_trains_a_float32_lora_on_comfyui_ggufs_own_model(comfy):
    """An unlearning LoRA on a GGUF model: trained through ComfyUI-GGUF's own layers (dequantized at
    each forward, the packed weights never written), then carried as patches its layers add."""
    import comfy.model_management as mm
    model, clip, nodes = _gguf_tiny()
    packed = {n: p.data.clone() for n, p in model.model.diffusion_model.named_parameters()}
    out, edit, _plot = _node(comfy, "ConceptEditTrainUnlearn", model=model, clip=clip, concept="red", method="rgd",
                             steps=2, rank=2, batch=2, n_prompts=2, gen_steps=2, width=64, height=64)
    assert edit.changes and set(out.patches) == set(edit.changes) and isinstance(out, nodes.GGUFModelPatcher)
    assert any(k.endswith("attn2.to_k.weight") for k in edit.changes)
    for c in edit.changes.values():
        assert c.kind == "lowrank" and c.tensors["up"].dtype == c.tensors["down"].dtype == torch.float32
    assert any(float(c.delta(dtype=torch.float32).abs().max()) > 0 for c in edit.changes.values())
    lines = rounding_summary(rounding_per_layer(edit, 1.0, (original_weights(model),)))
    assert len(lines) == 1 and "nothing is rounded back" in lines[0]
    _sample_one_step(comfy, out, clip)
    mm.unload_all_models()
    assert not model.patches
    for n, p in model.model.diffusion_model.named_parameters():
        assert torch.equal(p.data, packed[n]), n

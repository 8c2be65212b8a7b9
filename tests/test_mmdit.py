"""Flux and SD3 (MMDiT: no attn2, the text enters through joint attention) built with ComfyUI's own
`Flux` and `SD3` model classes at small widths, random weights: given the CLIP of another model
(an SD CLIP-L), EMCID and every other method refuse with a message that names the model and what
to connect, before anything is computed, and leave the inputs untouched; the methods run on the tiny Flux in
tests/test_flux.py and on SD3's text stack in tests/test_sd3.py.
The 2024-03 ComfyUI has neither class (the key-level refusal is in tests/test_arch.py)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conceptedit.editing.errors import ConceptEditError
from helpers import random_clip
from test_layout_matrix import _node

pytestmark = pytest.mark.skipif(importlib.util.find_spec("comfy.ldm.flux") is None,
                                reason="this ComfyUI has no Flux/SD3 classes (the 2024-03 copy)")

FLUX = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 48, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": False}
SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 32,
       "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 128}},
       "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None}


def _model(kind: str):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    config = sm.Flux(dict(FLUX)) if kind == "flux" else sm.SD3(dict(SD3))
    base = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's classes leave weights uninitialised (its loader fills them)
        for t in base.state_dict().values():  # parameters and buffers (SD3's pos_embed)
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


REFUSALS = {  # an SD CLIP, 64 wide: neither model reads text that wide (48 here)
    "sd3": r"this CLIP \(clip_l\) gives text 64 wide, but this SD3-layout .* reads text 48 wide: connect the CLIP of "
           r"the model's own checkpoint \(SD3: clip_l \+ clip_g \+ t5xxl \(TripleCLIPLoader\)",
    "flux": r"this CLIP \(clip_l\) gives text 64 wide, but this Flux-layout .* reads text 48 wide: connect the CLIP "
            r"of the model's own checkpoint \(Flux.1: clip_l \+ t5xxl \(DualCLIPLoader, type flux\)",
}


@pytest.mark.parametrize("use_stage1", [True, False])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
@torch.inference_mode()
def test_emcid_refuses_a_clip_of_another_model_and_says_what_to_do(comfy, kind, use_stage1):
    model, clip = _model(kind), random_clip()  # an SD CLIP-L: no T5
    assert type(model.model).__name__ == {"flux": "Flux", "sd3": "SD3"}[kind]
    before = {k: v.clone() for k, v in model.model_state_dict().items()}
    clip_before = {k: v.clone() for k, v in clip.patcher.model_state_dict().items()}
    with pytest.raises(ConceptEditError, match=REFUSALS[kind]):
        _node(comfy, "ConceptEditTextEncoderEdit", model=model, clip=clip, concepts="red -> blue",
              use_stage1=use_stage1)
    assert not model.patches and not clip.patcher.patches
    assert all(torch.equal(v, clip_before[k]) for k, v in clip.patcher.model_state_dict().items())
    changed = [k for k, v in model.model_state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, changed[:5]


@pytest.mark.parametrize("node,given", [
    ("ConceptEditCrossAttentionEdit", {"concepts": "red"}),
    ("ConceptEditUCEDebias", {"concepts": "doctor", "options": "man, woman"}),
    ("ConceptEditConceptPrune", {"concepts": "red"}),
    ("ConceptEditTrainUnlearn", {"concept": "red"}),
])
@torch.inference_mode()
def test_every_method_refuses_a_clip_of_another_model_before_it_runs(comfy, node, given):
    model, clip = _model("sd3"), random_clip()
    with pytest.raises(ConceptEditError, match=REFUSALS["sd3"]):
        _node(comfy, node, model=model, clip=clip, **given)
    assert not model.patches and not clip.patcher.patches

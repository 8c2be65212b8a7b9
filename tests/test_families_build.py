"""Every family of tests/families.py builds, encodes with ComfyUI's CLIPTextEncode and samples one step
with ComfyUI's common_ksampler from the empty latent that ComfyUI's own templates make for it."""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("comfy.ldm.qwen_image") is None:
    pytest.skip("this ComfyUI predates Qwen-Image, Wan, HiDream, Flux.2 ... (the 2024-03 copy): "
                "set COMFYUI_PATH to ComfyUI 0.3.75", allow_module_level=True)

import families  # noqa: E402

PROMPT = "a red circle"
# latent size in image pixels per latent pixel, per empty-latent node
_DOWNSCALE = {"EmptyLatentImage": 8, "EmptySD3LatentImage": 8, "EmptyHunyuanLatentVideo": 8,
              "EmptyFlux2LatentImage": 16, "Wan22ImageToVideoLatent": 16, "EmptyHunyuanImageLatent": 32}


def _size(name: str) -> int:
    # PixArt's sin-cos position embedding divides by round(mean latent side / 64): at least 320 px
    return 512 if name == "pixart_sigma" else 64


def _empty_latent(comfy, node: str, px: int) -> dict:
    """The latent as a ComfyUI user makes it: the node's own code (V3 nodes are classmethods)."""
    if node == "EmptyLatentImage":
        return comfy.EmptyLatentImage().generate(px, px, 1)[0]
    if node == "EmptySD3LatentImage":
        from comfy_extras.nodes_sd3 import EmptySD3LatentImage
        return EmptySD3LatentImage.execute(width=px, height=px, batch_size=1)[0]
    if node == "EmptyFlux2LatentImage":
        from comfy_extras.nodes_flux import EmptyFlux2LatentImage
        return EmptyFlux2LatentImage.execute(width=px, height=px, batch_size=1)[0]
    if node == "EmptyHunyuanLatentVideo":
        from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo
        return EmptyHunyuanLatentVideo.execute(width=px, height=px, length=1, batch_size=1)[0]
    if node == "EmptyHunyuanImageLatent":
        from comfy_extras.nodes_hunyuan import EmptyHunyuanImageLatent
        return EmptyHunyuanImageLatent.execute(width=px, height=px, batch_size=1)[0]
    if node == "Wan22ImageToVideoLatent":  # without a start image the VAE is not used
        from comfy_extras.nodes_wan import Wan22ImageToVideoLatent
        return Wan22ImageToVideoLatent.execute(vae=None, width=px, height=px, length=1, batch_size=1)[0]
    raise KeyError(node)


def _check_text_inputs(model, info, cond):
    """Each listed key reads the conditioning entry it is listed under, at that entry's width."""
    sd = model.model.diffusion_model.state_dict()
    entries = {"c_crossattn": cond[0][0], **cond[0][1]}
    checked = 0
    for entry, keys in info["text_inputs"].items():
        value = entries.get(entry)
        if value is None:  # e.g. byT5's only with quoted text
            continue
        for key in keys:
            w = sd[key]
            width = w.shape[1] if w.ndim == 2 else w.shape[0]  # Linear weight, or a norm's weight / bias
            if key.endswith(".bias") and w.ndim == 1 and "norm" not in key:
                continue  # a Linear's bias has its output width
            assert width == value.shape[-1], f"{key} {tuple(w.shape)} does not read {entry} {tuple(value.shape)}"
            checked += 1
    assert checked > 0


def _sample_one_step(comfy, name, model, info, pos, neg):
    px = _size(name)
    latent = _empty_latent(comfy, info["latent_node"], px)
    out = comfy.common_ksampler(model, 0, 1, 2.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    side = px // _DOWNSCALE[info["latent_node"]]
    frames = (1,) if info["latent_dimensions"] == 3 else ()
    assert tuple(out.shape) == (1, info["latent_channels"], *frames, side, side)
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("name", families.NAMES)
def test_family_builds_encodes_and_samples(comfy, one_thread, name):
    reason = families.missing(name)
    if reason:
        pytest.skip(reason)
    with torch.inference_mode():
        model, clip, info = families.build(name)
        assert clip is not None
        context, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
        assert context.shape[-1] == info["context_width"]
        assert torch.isfinite(context).all()
        assert (0 if pooled is None else pooled.shape[-1]) == info["pooled_width"]
        pos = comfy.CLIPTextEncode().encode(clip, PROMPT)[0]
        neg = comfy.CLIPTextEncode().encode(clip, "")[0]
        _check_text_inputs(model, info, pos)
        _sample_one_step(comfy, name, model, info, pos, neg)
    assert info["video"] == (info["latent_node"] in ("EmptyHunyuanLatentVideo", "Wan22ImageToVideoLatent"))


def test_hunyuan_image_reads_quoted_text_with_byt5(comfy, one_thread):
    """HunyuanImage 2.1's second encoder: byT5 runs on quoted text only, into byt5_in."""
    reason = families.missing("hunyuan_image21")
    if reason:
        pytest.skip(reason)
    with torch.inference_mode():
        model, clip, info = families.build("hunyuan_image21")
        pos = comfy.CLIPTextEncode().encode(clip, 'a sign that says "open"')[0]
        neg = comfy.CLIPTextEncode().encode(clip, "")[0]
        assert pos[0][1]["conditioning_byt5small"].shape[-1] == 1472
        assert "conditioning_byt5small" not in neg[0][1]
        _check_text_inputs(model, info, pos)
        _sample_one_step(comfy, "hunyuan_image21", model, info, pos, neg)


def test_builds_are_seeded(comfy):
    if families.missing("wan21"):
        pytest.skip(families.missing("wan21"))
    a, _, _ = families.build("wan21", seed=3, clip=False)
    b, _, _ = families.build("wan21", seed=3, clip=False)
    c, _, _ = families.build("wan21", seed=4, clip=False)
    wa, wb, wc = (m.model.diffusion_model.text_embedding[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)

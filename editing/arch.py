"""Architecture tables: which weights of a Stable Diffusion model the methods touch, by name.

One `Family` per model family (SD1.x, SD2.x, SDXL, and the project's tiny model). A family is
generated from the UNet's block structure (the same recipe `openaimodel.UNetModel` follows), so
the transformer blocks, their widths and both naming schemes (ComfyUI/LDM and diffusers) come
from one place. Canonical keys are ComfyUI patch keys:
``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`` and
``clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .errors import UnknownArchitectureError

UNET_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class TransformerBlock:
    """One SpatialTransformer's `transformer_blocks.K` with its LDM and diffusers module paths."""

    ldm: str        # e.g. "input_blocks.1.1.transformer_blocks.0"
    diffusers: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0"
    dim: int        # the block's channel width d (FFN is d -> 4d -> d)


@dataclass(frozen=True)
class TextEncoderSpec:
    """A CLIP text encoder as ComfyUI names it (``clip_l``), with its width and MLP size."""

    name: str             # ComfyUI clip name: "clip_l", "clip_h", "clip_g"
    width: int
    layers: int
    mlp: int
    diffusers: str        # "text_encoder" or "text_encoder_2"
    kohya: str            # "lora_te" / "lora_te1" / "lora_te2"
    a1111: str            # checkpoint prefix, for documentation and detection of full checkpoints
    edit_layers: tuple[int, ...] = ()  # EMCID's default fc2 layers to edit

    def fc2_key(self, i: int) -> str:
        return f"{self.name}.transformer.text_model.encoder.layers.{i}.mlp.fc2.weight"

    def fc2_module(self, i: int) -> str:
        return f"text_model.encoder.layers.{i}.mlp.fc2"


@dataclass(frozen=True)
class Family:
    name: str                      # "sd1", "sd2", "sdxl", "tiny"
    label: str
    context_dim: int
    blocks: tuple[TransformerBlock, ...]
    text_encoders: tuple[TextEncoderSpec, ...]
    unet_config: Mapping = field(default_factory=dict, hash=False, compare=False)

    # ---- UNet keys (ComfyUI patch keys) -------------------------------------------------
    def attn2_kv_keys(self) -> list[str]:
        return [f"{UNET_PREFIX}{b.ldm}.attn2.{p}.weight" for b in self.blocks for p in ("to_k", "to_v")]

    def ffn_out_keys(self) -> list[str]:
        return [f"{UNET_PREFIX}{b.ldm}.ff.net.2.weight" for b in self.blocks]

    def geglu_keys(self) -> list[str]:
        return [f"{UNET_PREFIX}{b.ldm}.ff.net.0.proj.weight" for b in self.blocks]

    def ffn_out_modules(self) -> list[str]:
        """Module paths inside the diffusion model (no prefix) whose *input* ConceptPrune reads."""
        return [f"{b.ldm}.ff.net.2" for b in self.blocks]

    def te_fc2_keys(self) -> list[str]:
        return [te.fc2_key(i) for te in self.text_encoders for i in range(te.layers)]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key the tables name, with the shape of its weight."""
        out: dict[str, tuple[int, ...]] = {}
        for b in self.blocks:
            base = f"{UNET_PREFIX}{b.ldm}"
            out[f"{base}.attn2.to_k.weight"] = (b.dim, self.context_dim)
            out[f"{base}.attn2.to_v.weight"] = (b.dim, self.context_dim)
            out[f"{base}.ff.net.0.proj.weight"] = (8 * b.dim, b.dim)
            out[f"{base}.ff.net.2.weight"] = (b.dim, 4 * b.dim)
        for te in self.text_encoders:
            for i in range(te.layers):
                out[te.fc2_key(i)] = (te.width, te.mlp)
        return out

    def block_of(self, key: str) -> TransformerBlock | None:
        for b in self.blocks:
            if key.startswith(f"{UNET_PREFIX}{b.ldm}."):
                return b
        return None

    # ---- other naming schemes ------------------------------------------------------------
    def to_diffusers(self, key: str) -> str:
        """ComfyUI key -> diffusers module-parameter name (``unet.`` / ``text_encoder.`` prefixed)."""
        if key.startswith(UNET_PREFIX):
            rest = key[len(UNET_PREFIX):]
            for b in self.blocks:
                if rest.startswith(b.ldm + "."):
                    return "unet." + b.diffusers + rest[len(b.ldm):]
            raise KeyError(f"{key} is not in the {self.label} table")
        for te in self.text_encoders:
            p = f"{te.name}.transformer."
            if key.startswith(p):
                return f"{te.diffusers}." + key[len(p):]
        raise KeyError(f"{key} is not in the {self.label} table")

    def to_kohya(self, key: str) -> str:
        """ComfyUI key -> kohya LoRA module name (LDM-style UNet names, which ComfyUI and A1111 read)."""
        if key.startswith(UNET_PREFIX):
            mod = key[len(UNET_PREFIX):].rsplit(".weight", 1)[0]
            return "lora_unet_" + mod.replace(".", "_")
        for te in self.text_encoders:
            p = f"{te.name}.transformer."
            if key.startswith(p):
                mod = key[len(p):].rsplit(".weight", 1)[0]
                return f"{te.kohya}_" + mod.replace(".", "_")
        raise KeyError(f"{key} is not in the {self.label} table")

    def to_kohya_diffusers_style(self, key: str) -> str:
        """ComfyUI UNet key -> kohya name in the diffusers style (``lora_unet_down_blocks_0_...``)."""
        d = self.to_diffusers(key)
        if d.startswith("unet."):
            return "lora_unet_" + d[len("unet."):].rsplit(".weight", 1)[0].replace(".", "_")
        return self.to_kohya(key)


def _blocks_from_unet(cfg: Mapping) -> tuple[TransformerBlock, ...]:
    """The transformer blocks of an LDM UNet, in execution order, from a config in ComfyUI's
    format (as `comfy.model_detection` produces it): ``num_res_blocks`` per level,
    ``transformer_depth`` per input block, ``transformer_depth_output`` per output block (ComfyUI
    pops it from the end, so it is listed bottom-up), ``transformer_depth_middle``."""
    ch = cfg["model_channels"]
    mult = list(cfg["channel_mult"])
    nres = cfg["num_res_blocks"]
    nres = [nres] * len(mult) if isinstance(nres, int) else list(nres)
    depth_in = list(cfg["transformer_depth"])
    depth_out = list(cfg["transformer_depth_output"])
    blocks: list[TransformerBlock] = []
    idx = 0
    for level, m in enumerate(mult):
        for r in range(nres[level]):
            idx += 1
            for k in range(depth_in.pop(0)):
                blocks.append(TransformerBlock(f"input_blocks.{idx}.1.transformer_blocks.{k}",
                                               f"down_blocks.{level}.attentions.{r}.transformer_blocks.{k}", ch * m))
        if level != len(mult) - 1:
            idx += 1  # downsample
    for k in range(cfg.get("transformer_depth_middle") or 0):
        blocks.append(TransformerBlock(f"middle_block.1.transformer_blocks.{k}",
                                       f"mid_block.attentions.0.transformer_blocks.{k}", ch * mult[-1]))
    out_idx = 0
    for up, level in enumerate(reversed(range(len(mult)))):
        for r in range(nres[level] + 1):
            for k in range(depth_out.pop()):
                blocks.append(TransformerBlock(f"output_blocks.{out_idx}.1.transformer_blocks.{k}",
                                               f"up_blocks.{up}.attentions.{r}.transformer_blocks.{k}", ch * mult[level]))
            out_idx += 1
    return tuple(blocks)


CLIP_L = TextEncoderSpec("clip_l", 768, 12, 3072, "text_encoder", "lora_te",
                         "cond_stage_model.transformer.", edit_layers=tuple(range(0, 11)))
CLIP_H = TextEncoderSpec("clip_h", 1024, 24, 4096, "text_encoder", "lora_te",
                         "cond_stage_model.model.", edit_layers=tuple(range(0, 22)))
CLIP_L_XL = TextEncoderSpec("clip_l", 768, 12, 3072, "text_encoder", "lora_te1",
                            "conditioner.embedders.0.transformer.", edit_layers=(8, 9, 10))
CLIP_G = TextEncoderSpec("clip_g", 1280, 32, 5120, "text_encoder_2", "lora_te2",
                         "conditioner.embedders.1.model.", edit_layers=(26, 27, 28, 29, 30))

# Full UNet configs in ComfyUI's format (what comfy.model_detection reads off a checkpoint); the
# tests build the real layouts from them on the meta device.
_COMMON = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
               legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
SD1_UNET = dict(_COMMON, adm_in_channels=None, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                use_linear_in_transformer=False, context_dim=768, num_heads=8,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
SD2_UNET = dict(SD1_UNET, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64)
del SD2_UNET["num_heads"]
SDXL_UNET = dict(_COMMON, num_classes="sequential", adm_in_channels=2816, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
# The project's tiny model (see tiny/): the same block structure, small widths, 64-wide text.
# Attention at 16x16 and 8x8 only, and no input res-block at full resolution: the 32x32 level is
# what costs most to train on a CPU.
TINY_UNET = dict(_COMMON, adm_in_channels=None, model_channels=32, num_res_blocks=[0, 1, 1],
                 transformer_depth=[1, 1], channel_mult=[1, 2, 2], transformer_depth_middle=1,
                 use_linear_in_transformer=True, context_dim=64, num_head_channels=16,
                 transformer_depth_output=[0, 1, 1, 1, 1])
TINY_CLIP = TextEncoderSpec("clip_l", 64, 4, 256, "text_encoder", "lora_te",
                            "cond_stage_model.transformer.", edit_layers=(0, 1, 2))

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD1.x", 768, _blocks_from_unet(SD1_UNET), (CLIP_L,), SD1_UNET),
    "sd2": Family("sd2", "SD2.x", 1024, _blocks_from_unet(SD2_UNET), (CLIP_H,), SD2_UNET),
    "sdxl": Family("sdxl", "SDXL", 2048, _blocks_from_unet(SDXL_UNET), (CLIP_L_XL, CLIP_G), SDXL_UNET),
    "tiny": Family("tiny", "ConceptEdit tiny", TINY_UNET["context_dim"], _blocks_from_unet(TINY_UNET),
                   (TINY_CLIP,), TINY_UNET),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def _normalise_unet_keys(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Accept checkpoint (``model.diffusion_model.``), ComfyUI (``diffusion_model.``) or bare keys."""
    out = {}
    for k, s in shapes.items():
        if k.startswith("model.diffusion_model."):
            k = k[len("model."):]
        elif not k.startswith(UNET_PREFIX) and (k.startswith(("input_blocks.", "middle_block.", "output_blocks."))):
            k = UNET_PREFIX + k
        out[k] = tuple(s)
    return out


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """The family whose UNet table matches these keys and shapes exactly (text encoders optional).

    `shapes` maps key -> shape (a state dict's ``{k: tuple(v.shape)}``).
    """
    shapes = _normalise_unet_keys(shapes)
    seen_ctx = sorted({s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2})
    for fam in FAMILIES.values():
        exp = {k: v for k, v in fam.expected_shapes().items() if k.startswith(UNET_PREFIX)}
        if all(shapes.get(k) == v for k, v in exp.items()):
            n_blocks = sum(1 for k in shapes if k.endswith("attn2.to_k.weight"))
            if n_blocks == len(fam.blocks):
                return fam
    n = sum(1 for k in shapes if k.endswith("attn2.to_k.weight"))
    raise UnknownArchitectureError(
        f"this model is not one ConceptEdit knows: it has {n} cross-attention blocks with text width "
        f"{seen_ctx or 'none'}; supported are SD1.x (16 blocks, 768), SD2.x (16, 1024), SDXL (70, 2048)"
        f" and the bundled tiny model ({len(FAMILIES['tiny'].blocks)}, {FAMILIES['tiny'].context_dim}). SD3/Flux (MMDiT) models have no attn2 blocks and are not supported yet.")


def fingerprint(family: Family, state: Mapping[str, "object"]) -> dict:
    """A base-model fingerprint: the family, a hash of the table's key names and shapes (the
    layout), and a coarse hash of a few weight values (which checkpoint), robust to the dtype the
    model was loaded in. `state` maps ComfyUI keys to tensors (UNet keys at least)."""
    exp = family.expected_shapes()
    layout = hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in exp.items())).encode()).hexdigest()[:16]
    probe = []
    for key in family.attn2_kv_keys()[:4] + family.ffn_out_keys()[:2]:
        w = state.get(key)
        if w is None:
            continue
        v = w.detach().reshape(-1)[:4096].double().abs().sum().item()
        probe.append(f"{key}={v:.3g}")
    weights = hashlib.sha256("|".join(probe).encode()).hexdigest()[:16] if probe else ""
    return {"family": family.name, "layout": layout, "weights": weights}

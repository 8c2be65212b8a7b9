"""Model layouts: which weights of a Stable Diffusion model the methods touch, by name.

The layout is read from the loaded model (`discover_layout`): every SpatialTransformer block with
a cross-attention `attn2` is found by its key names, with its widths taken from the weights'
shapes, so any SD-style UNet gets every method: SD1.x/2.x/SDXL and their finetunes, inpainting
UNets, the SDXL refiner, pruned or distilled students, custom layouts. A `Family` is that layout.
The tables below (SD1.x, SD2.x, SDXL, the project's tiny model) remain only for what a model's
keys cannot tell: a family's name, diffusers/kohya names, EMCID's default layers and the native
resolution; a layout equal to a table's gets the table's names. Canonical keys are ComfyUI patch keys:
``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`` and
``clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight``.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from .errors import UnknownArchitectureError

UNET_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class TransformerBlock:
    """One SpatialTransformer's `transformer_blocks.K` with its LDM and diffusers module paths."""

    ldm: str        # e.g. "input_blocks.1.1.transformer_blocks.0"
    diffusers: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0"; "" when not known
    dim: int        # the block's channel width d (FFN is d -> 4d -> d)
    kv: int = 0       # rows of attn2.to_k / to_v (0: d, as in every SD UNet)
    ff_inner: int = 0  # columns of ff.net.2, the FFN's hidden width (0: 4d); -1: the block has no ff.net.2
    geglu: bool = True  # ff.net.0.proj is a GEGLU projection (d -> 2·inner)

    @property
    def kv_rows(self) -> int:
        return self.kv or self.dim

    @property
    def ffn(self) -> int:
        return 4 * self.dim if self.ff_inner == 0 else self.ff_inner

    @property
    def has_ffn(self) -> bool:
        return self.ff_inner >= 0


@dataclass(frozen=True)
class TextEncoderSpec:
    """A text encoder as ComfyUI names it (``clip_l``, ``t5xxl``), with its width and MLP size.

    `kind` "clip": a CLIP text transformer (BOS first, causal, ``mlp.fc2`` the MLP's output Linear);
    "t5": ComfyUI's T5 encoder (no BOS, bidirectional, ``layer.1.DenseReluDense.wo``), which Flux
    and SD3 read. "fc2" below names the MLP's output Linear of either."""

    name: str             # ComfyUI clip name: "clip_l", "clip_h", "clip_g", "t5xxl"
    width: int
    layers: int
    mlp: int
    diffusers: str        # "text_encoder", "text_encoder_2", ...
    kohya: str            # "lora_te" / "lora_te1" / "lora_te2" / ...
    a1111: str            # checkpoint prefix, for documentation and detection of full checkpoints
    edit_layers: tuple[int, ...] = ()  # EMCID's default fc2 layers to edit
    kind: str = "clip"

    def block_module(self, i: int) -> str:
        """Layer i's module whose output is the residual stream after that layer."""
        return f"encoder.block.{i}.layer.1" if self.kind == "t5" else f"text_model.encoder.layers.{i}"

    def fc2_module(self, i: int) -> str:
        return (f"encoder.block.{i}.layer.1.DenseReluDense.wo" if self.kind == "t5"
                else f"text_model.encoder.layers.{i}.mlp.fc2")

    def fc2_key(self, i: int) -> str:
        return f"{self.name}.transformer.{self.fc2_module(i)}.weight"

    @property
    def first_token(self) -> int:
        """Index of a prompt's first real token (CLIP puts BOS before it, T5 nothing)."""
        return 0 if self.kind == "t5" else 1


@dataclass(frozen=True)
class TextProjection:
    """A Linear through which text enters an MMDiT (Flux, SD3): the closed form's layer there.

    `source` says what it reads: ``"tokens"`` (the per-token context, T5 for Flux, CLIP+T5 for SD3)
    or ``"pooled"`` (the pooled CLIP vector)."""

    module: str      # inside the diffusion model, e.g. "txt_in", "vector_in.in_layer"
    source: str      # "tokens" or "pooled"
    rows: int        # output width (the DiT's hidden size)
    cols: int        # input width (the text feature width)
    diffusers: str   # e.g. "context_embedder", "time_text_embed.text_embedder.linear_1"

    @property
    def key(self) -> str:
        return f"{UNET_PREFIX}{self.module}.weight"


@dataclass(frozen=True)
class DiTMLP:
    """An MLP of a DiT block whose hidden activations ConceptPrune scores: `module`'s input columns
    ``offset .. offset + inner`` are the MLP neurons (Flux single blocks fuse attention and MLP in
    `linear2`, whose first `hidden` input columns are the attention output)."""

    module: str      # e.g. "double_blocks.0.img_mlp.2", "single_blocks.0.linear2", "joint_blocks.0.x_block.mlp.fc2"
    dim: int         # output width
    inner: int       # MLP neurons
    offset: int = 0  # first neuron column in the weight
    diffusers: str = ""

    @property
    def key(self) -> str:
        return f"{UNET_PREFIX}{self.module}.weight"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.offset + self.inner)


@dataclass(frozen=True)
class Family:
    """A model's layout: its cross-attention transformer blocks and text encoders.

    `name` is a table's ("sd1", "sd2", "sdxl", "tiny") when the layout equals that table's, else
    "custom" (a layout no table names: every method still applies; diffusers names are known only
    when the host passes the UNet's config)."""

    name: str                      # "sd1", "sd2", "sdxl", "tiny" or "custom"
    label: str
    context_dim: int
    blocks: tuple[TransformerBlock, ...]
    text_encoders: tuple[TextEncoderSpec, ...]
    unet_config: Mapping = field(default_factory=dict, hash=False, compare=False)
    native_latent: int = 64        # latent side of the native resolution (64 = 512 px)
    kind: str = "unet"             # "unet" (attn2 cross-attention), "flux" or "sd3" (MMDiT)
    projections: tuple[TextProjection, ...] = ()   # MMDiT: where the text enters
    mlps: tuple[DiTMLP, ...] = ()                  # MMDiT: the image-stream MLPs

    @property
    def known(self) -> bool:
        return self.name in FAMILIES

    @property
    def is_mmdit(self) -> bool:
        return self.kind != "unet"

    def projection_keys(self, source: str | None = None) -> list[str]:
        return [p.key for p in self.projections if source is None or p.source == source]

    def projection(self, key: str) -> TextProjection | None:
        return next((p for p in self.projections if p.key == key), None)

    # ---- UNet keys (ComfyUI patch keys) -------------------------------------------------
    def attn2_kv_keys(self) -> list[str]:
        return [f"{UNET_PREFIX}{b.ldm}.attn2.{p}.weight" for b in self.blocks for p in ("to_k", "to_v")]

    def ffn_out_keys(self) -> list[str]:
        return [f"{UNET_PREFIX}{b.ldm}.ff.net.2.weight" for b in self.blocks if b.has_ffn]

    def geglu_keys(self) -> list[str]:
        return [f"{UNET_PREFIX}{b.ldm}.ff.net.0.proj.weight" for b in self.blocks if b.has_ffn and b.geglu]

    def ffn_out_modules(self) -> list[str]:
        """Module paths inside the diffusion model (no prefix) whose *input* ConceptPrune reads."""
        return [f"{b.ldm}.ff.net.2" for b in self.blocks if b.has_ffn]

    def te_fc2_keys(self) -> list[str]:
        return [te.fc2_key(i) for te in self.text_encoders for i in range(te.layers)]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key the tables name, with the shape of its weight."""
        out: dict[str, tuple[int, ...]] = {}
        for b in self.blocks:
            base = f"{UNET_PREFIX}{b.ldm}"
            out[f"{base}.attn2.to_k.weight"] = (b.kv_rows, self.context_dim)
            out[f"{base}.attn2.to_v.weight"] = (b.kv_rows, self.context_dim)
            if b.has_ffn:
                if b.geglu:
                    out[f"{base}.ff.net.0.proj.weight"] = (2 * b.ffn, b.dim)
                out[f"{base}.ff.net.2.weight"] = (b.dim, b.ffn)
        for p in self.projections:
            out[p.key] = (p.rows, p.cols)
        for m in self.mlps:
            out[m.key] = m.shape
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
        if key.startswith(UNET_PREFIX) and self.is_mmdit:
            return "transformer." + dit_to_diffusers(self, key[len(UNET_PREFIX):])
        if key.startswith(UNET_PREFIX):
            rest = key[len(UNET_PREFIX):]
            for b in self.blocks:
                if rest.startswith(b.ldm + "."):
                    if not b.diffusers:
                        raise KeyError(f"{key}: diffusers names of this {self.label} layout are not known "
                                       "(export with LDM-style names, which ComfyUI and A1111 read)")
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
    "sd1": Family("sd1", "SD1.x", 768, _blocks_from_unet(SD1_UNET), (CLIP_L,), SD1_UNET, native_latent=64),
    "sd2": Family("sd2", "SD2.x", 1024, _blocks_from_unet(SD2_UNET), (CLIP_H,), SD2_UNET, native_latent=96),
    "sdxl": Family("sdxl", "SDXL", 2048, _blocks_from_unet(SDXL_UNET), (CLIP_L_XL, CLIP_G), SDXL_UNET,
                   native_latent=128),
    "tiny": Family("tiny", "ConceptEdit tiny", TINY_UNET["context_dim"], _blocks_from_unet(TINY_UNET),
                   (TINY_CLIP,), TINY_UNET, native_latent=32),
}
CUSTOM = "custom"
# The families trained on the bundled tiny world (its prompts, classifier and defaults apply)
TINY_WORLD_FAMILIES = ("tiny", "tiny-flux")
_TABLE_ENCODERS = (CLIP_L, CLIP_H, CLIP_G, TINY_CLIP)
# The T5 encoders Flux and SD3 read: T5-XXL v1.1 (its MLP is gated GELU, wi_0/wi_1 -> wo) and the
# tiny Flux's T5. EMCID's layers on them are not the official code's (it has no T5). T5 attends
# both ways and Flux reads the prompt from the padding positions too (swapping them alone turns a
# red circle blue on the tiny Flux; swapping the word's own last-layer state does nothing), so an
# edit at a word must sit early enough for later layers to carry it into the rest of the sequence:
# the tiny T5's layer 0 (of 2); T5-XXL's 6..10 of 24 (not measured on T5-XXL).
T5_XXL = TextEncoderSpec("t5xxl", 4096, 24, 10240, "text_encoder_2", "lora_te2", "text_encoders.t5xxl.transformer.",
                         edit_layers=(6, 7, 8, 9, 10), kind="t5")
TINY_T5 = TextEncoderSpec("t5xxl", 64, 2, 128, "text_encoder_2", "lora_te2", "text_encoders.t5xxl.transformer.",
                          edit_layers=(0,), kind="t5")
_T5_TABLES = (T5_XXL, TINY_T5)


# ---- MMDiT layouts (Flux, SD3) ------------------------------------------------------------------
_FLUX_HINTS = ("double_blocks.", "single_blocks.", "txt_in.", "vector_in.")
_SD3_HINTS = ("joint_blocks.", "context_embedder.", "y_embedder.")
_DOUBLE_MLP = re.compile(r"^double_blocks\.(\d+)\.img_mlp\.2$")
_SINGLE_L2 = re.compile(r"^single_blocks\.(\d+)\.linear2$")
_JOINT_FC2 = re.compile(r"^joint_blocks\.(\d+)\.x_block\.mlp\.fc2$")


def dit_kind(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """"flux" or "sd3" when these (normalised) keys are an MMDiT's, else None."""
    rest = [k[len(UNET_PREFIX):] for k in shapes if k.startswith(UNET_PREFIX)]
    if any(k.startswith(_FLUX_HINTS) for k in rest):
        return "flux"
    if any(k.startswith(_SD3_HINTS) for k in rest):
        return "sd3"
    return None


def dit_to_diffusers(family: "Family", module_param: str) -> str:
    """An MMDiT's ComfyUI module path (no prefix, with .weight) -> the diffusers transformer's name
    (``txt_in.weight`` -> ``context_embedder.weight``), for the layers ConceptEdit edits."""
    mod, _, param = module_param.rpartition(".")
    if family.kind == "flux":
        fixed = {"txt_in": "context_embedder", "vector_in.in_layer": "time_text_embed.text_embedder.linear_1"}
        if mod in fixed:
            return f"{fixed[mod]}.{param}"
        m = re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_mlp\.([02])", mod)
        if m:
            ff = "ff" if m.group(2) == "img" else "ff_context"
            return f"transformer_blocks.{m.group(1)}.{ff}.net.{'0.proj' if m.group(3) == '0' else '2'}.{param}"
        m = re.fullmatch(r"single_blocks\.(\d+)\.linear2", mod)
        if m:
            return f"single_transformer_blocks.{m.group(1)}.proj_out.{param}"
    elif family.kind == "sd3":
        fixed = {"context_embedder": "context_embedder", "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1"}
        if mod in fixed:
            return f"{fixed[mod]}.{param}"
        m = re.fullmatch(r"joint_blocks\.(\d+)\.x_block\.mlp\.fc([12])", mod)
        if m:
            return f"transformer_blocks.{m.group(1)}.ff.net.{'0.proj' if m.group(2) == '1' else '2'}.{param}"
    raise KeyError(f"{module_param}: no diffusers name is known for this {family.label} layer")


def _dit_parts(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[TextProjection, ...], tuple[DiTMLP, ...]]:
    """The text projections and image-stream MLPs these keys name (any subset of a model's)."""
    def mod_shape(mod):
        s = shapes.get(f"{UNET_PREFIX}{mod}.weight")
        return tuple(s) if s is not None and len(s) == 2 else None

    projs = []
    table = ((("txt_in", "tokens", "context_embedder"),
              ("vector_in.in_layer", "pooled", "time_text_embed.text_embedder.linear_1")) if kind == "flux" else
             (("context_embedder", "tokens", "context_embedder"),
              ("y_embedder.mlp.0", "pooled", "time_text_embed.text_embedder.linear_1")))
    for mod, source, diff in table:
        s = mod_shape(mod)
        if s is not None:
            projs.append(TextProjection(mod, source, int(s[0]), int(s[1]), diff))
    hidden = projs[0].rows if projs else 0
    qkv = shapes.get(f"{UNET_PREFIX}double_blocks.0.img_attn.qkv.weight")
    if qkv is not None:
        hidden = int(qkv[1])
    mlps = []
    for key in shapes:
        if not key.startswith(UNET_PREFIX) or not key.endswith(".weight"):
            continue
        mod = key[len(UNET_PREFIX):-len(".weight")]
        s = mod_shape(mod)
        if s is None:
            continue
        if kind == "flux" and _DOUBLE_MLP.match(mod):
            mlps.append(DiTMLP(mod, int(s[0]), int(s[1]), 0, dit_to_diffusers(Family("", "", 0, (), (), kind=kind),
                                                                              mod + ".weight")[:-len(".weight")]))
        elif kind == "flux" and _SINGLE_L2.match(mod):
            h = hidden or int(s[0])
            mlps.append(DiTMLP(mod, int(s[0]), int(s[1]) - h, h, f"single_transformer_blocks.{mod.split('.')[1]}.proj_out"))
        elif kind == "sd3" and _JOINT_FC2.match(mod):
            mlps.append(DiTMLP(mod, int(s[0]), int(s[1]), 0, f"transformer_blocks.{mod.split('.')[1]}.ff.net.2"))
    order = {"double_blocks": 0, "joint_blocks": 0, "single_blocks": 1}
    mlps.sort(key=lambda m: (order.get(m.module.split(".")[0], 2), int(m.module.split(".")[1])))
    return tuple(projs), tuple(mlps)


def _dit_family(kind: str, shapes: Mapping[str, tuple[int, ...]], text: tuple[TextEncoderSpec, ...] = (),
                unet_config: Mapping | None = None) -> Family:
    projs, mlps = _dit_parts(kind, shapes)
    tokens = [p for p in projs if p.source == "tokens"]
    hidden = tokens[0].rows if tokens else 0
    name = "Flux" if kind == "flux" else "SD3"
    probe = Family(CUSTOM, "", tokens[0].cols if tokens else 0, (), text, kind=kind, projections=projs, mlps=mlps)
    for fam in FAMILIES.values():
        if fam.kind == kind and _unet_shapes(fam) == _unet_shapes(probe):
            return replace(fam, text_encoders=text or fam.text_encoders, unet_config=dict(unet_config or {}))
    label = f"{name}-layout MMDiT ({len(mlps)} MLPs, hidden {hidden})"
    return replace(probe, label=label, unet_config=dict(unet_config or {}), native_latent=128)


def _unet_shapes(fam: Family) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in fam.expected_shapes().items() if k.startswith(UNET_PREFIX)}


def _flux_table(name: str, label: str, hidden: int, context: int, vec: int, depth: int, single: int,
                mlp: int, native: int, text: tuple[TextEncoderSpec, ...]) -> Family:
    shapes = {f"{UNET_PREFIX}txt_in.weight": (hidden, context), f"{UNET_PREFIX}vector_in.in_layer.weight": (hidden, vec),
              f"{UNET_PREFIX}double_blocks.0.img_attn.qkv.weight": (3 * hidden, hidden)}
    shapes.update({f"{UNET_PREFIX}double_blocks.{i}.img_mlp.2.weight": (hidden, mlp) for i in range(depth)})
    shapes.update({f"{UNET_PREFIX}single_blocks.{i}.linear2.weight": (hidden, hidden + mlp) for i in range(single)})
    projs, mlps = _dit_parts("flux", shapes)
    return Family(name, label, context, (), text, kind="flux", projections=projs, mlps=mlps, native_latent=native)


def _sd3_table(name: str, label: str, hidden: int, depth: int, native: int = 128) -> Family:
    shapes = {f"{UNET_PREFIX}context_embedder.weight": (hidden, 4096), f"{UNET_PREFIX}y_embedder.mlp.0.weight": (hidden, 2048)}
    shapes.update({f"{UNET_PREFIX}joint_blocks.{i}.x_block.mlp.fc2.weight": (hidden, 4 * hidden) for i in range(depth)})
    projs, mlps = _dit_parts("sd3", shapes)
    return Family(name, label, 4096, (), (), kind="sd3", projections=projs, mlps=mlps, native_latent=native)


# Flux.1 dev and schnell share these shapes (dev adds guidance_in); SD3 medium and SD3.5 medium
# share theirs. The tiny Flux is tiny/flux.py's.
# Flux's CLIP-L and T5 in ComfyUI's LoraLoader order (lora_te1, lora_te2) and diffusers' names
_FLUX_CLIP = "text_encoders.clip_l.transformer."
FAMILIES["flux1"] = _flux_table("flux1", "Flux.1", 3072, 4096, 768, 19, 38, 12288, 128,
                                (replace(CLIP_L, kohya="lora_te1", a1111=_FLUX_CLIP), T5_XXL))
FAMILIES["sd3-medium"] = _sd3_table("sd3-medium", "SD3 / SD3.5 medium", 1536, 24)
FAMILIES["sd3.5-large"] = _sd3_table("sd3.5-large", "SD3.5 large", 2432, 38)
FAMILIES["tiny-flux"] = _flux_table("tiny-flux", "ConceptEdit tiny Flux", 64, 64, 64, 2, 2, 256, 32,
                                    (replace(TINY_CLIP, kohya="lora_te1", a1111=_FLUX_CLIP), TINY_T5))


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_label(name: str) -> str:
    return FAMILIES[name].label if name in FAMILIES else f"a {name} layout"


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


_ATTN2_K = re.compile(r"^diffusion_model\.(.+\.transformer_blocks\.\d+)\.attn2\.to_k\.weight$")
_ANY_BLOCK = re.compile(r"^diffusion_model\.(.+\.transformer_blocks\.\d+)\.")
_SECTIONS = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
_TE_FC2 = re.compile(r"^(\w+)\.transformer\.(?:text_model\.encoder\.layers\.(\d+)\.mlp\.fc2"
                     r"|encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo)\.weight$")


def _execution_order(path: str) -> tuple:
    head = path.split(".", 1)[0]
    return (_SECTIONS.get(head, 3), head, *(int(p) for p in re.findall(r"\d+", path)))


def _refusal(shapes: Mapping[str, tuple[int, ...]], why: str) -> UnknownArchitectureError:
    dit = any(k.startswith(UNET_PREFIX + p) for k in shapes for p in ("double_blocks.", "joint_blocks.", "txt_in."))
    what = ("this is an MMDiT model (SD3/Flux): its text enters through joint attention, not attn2 blocks, "
            "and ConceptEdit does not edit those yet" if dit else why)
    return UnknownArchitectureError(f"ConceptEdit cannot edit this model: {what}. It edits SD-style UNets whose "
                                    "SpatialTransformer blocks have a cross-attention attn2 (SD1.x, SD2.x, SDXL, "
                                    "their finetunes, inpainting, refiner, pruned students, custom widths).")


def discover_blocks(shapes: Mapping[str, tuple[int, ...]]) -> tuple[TransformerBlock, ...]:
    """Every transformer block with a cross-attention, read off the UNet's key names and shapes,
    in execution order (input blocks, middle, output blocks)."""
    blocks = []
    for key, shape in shapes.items():
        m = _ATTN2_K.match(key)
        if m is None or len(shape) != 2:
            continue
        base = f"{UNET_PREFIX}{m.group(1)}"
        v = shapes.get(f"{base}.attn2.to_v.weight")
        if v is None or tuple(v) != tuple(shape):
            continue
        ff2 = shapes.get(f"{base}.ff.net.2.weight")
        out = shapes.get(f"{base}.attn2.to_out.0.weight")
        dim = int(ff2[0]) if ff2 else int(out[0]) if out else int(shape[0])
        inner = int(ff2[1]) if ff2 and len(ff2) == 2 else -1
        geglu = f"{base}.ff.net.0.proj.weight" in shapes
        blocks.append(TransformerBlock(m.group(1), "", dim, kv=0 if shape[0] == dim else int(shape[0]),
                                       ff_inner=0 if inner == 4 * dim else inner, geglu=geglu))
    return tuple(sorted(blocks, key=lambda b: _execution_order(b.ldm)))


def discover_text_encoders(shapes: Mapping[str, tuple[int, ...]]) -> tuple[TextEncoderSpec, ...]:
    """The text encoders of a ComfyUI CLIP state dict (``clip_l.transformer...``, ``t5xxl.transformer...``)
    in ComfyUI's order (CLIP-L, the other CLIPs, T5 last), with the names kohya, diffusers and
    EMCID's default layers take from the tables when an encoder matches."""
    found: dict[str, dict[int, tuple[int, ...]]] = {}
    kinds: dict[str, str] = {}
    for key, shape in shapes.items():
        m = _TE_FC2.match(key)
        if m and len(shape) == 2:
            found.setdefault(m.group(1), {})[int(m.group(2) or m.group(3))] = tuple(shape)
            kinds[m.group(1)] = "clip" if m.group(2) is not None else "t5"
    names = sorted(found, key=lambda n: (kinds[n] == "t5", n != "clip_l", n))
    clips = [n for n in names if kinds[n] == "clip"]
    out = []
    for i, name in enumerate(names):
        layers = found[name]
        n = max(layers) + 1
        width, mlp = layers[max(layers)]
        many = len(names) > 1
        # ComfyUI's LoraLoader numbers the encoders in this order (Flux: lora_te1 CLIP-L, lora_te2 T5;
        # SD3: te1 CLIP-L, te2 CLIP-G, te3 T5), except CLIP-G without CLIP-L, which it reads as lora_te
        kohya = f"lora_te{i + 1}" if many and not (name == "clip_g" and "clip_l" not in names) else "lora_te"
        diffusers = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        if kinds[name] == "t5":
            tables: tuple[TextEncoderSpec, ...] = _T5_TABLES
        else:  # beside a second CLIP, CLIP-L is SDXL's (EMCID edits its late layers there)
            tables = (CLIP_L_XL, CLIP_G) if len(clips) > 1 else _TABLE_ENCODERS
        table = [t for t in tables if (t.name, t.width, t.layers, t.mlp) == (name, width, n, mlp)]
        # EMCID edits the early-to-late fc2 layers: the table's choice when known, else all but the last
        edit = table[0].edit_layers if table else tuple(range(max(n - 1, 1)))
        a1111 = table[0].a1111 if table else ""
        out.append(TextEncoderSpec(name, int(width), n, int(mlp), diffusers, kohya, a1111, edit_layers=edit,
                                   kind=kinds[name]))
    return tuple(out)


def _placeholder_fc2(name: str) -> str:
    """A key of encoder `name` (for naming encoders an edit does not touch)."""
    spec = TextEncoderSpec(name, 1, 1, 1, "", "", "", kind="t5" if name.startswith("t5") else "clip")
    return spec.fc2_key(0)


def _edit_text_encoders(shapes: Mapping[str, tuple[int, ...]], encoders: Iterable[str]) -> tuple[TextEncoderSpec, ...]:
    """The text encoders an edit's keys name, with the model's other encoders (`encoders`, from the
    fingerprint) added, since every encoder decides kohya's ``lora_te`` numbering."""
    te = {k: s for k, s in shapes.items() if _TE_FC2.match(k)}
    names = list(encoders) or sorted({m.group(1) for k in te if (m := _TE_FC2.match(k))})
    te.update({_placeholder_fc2(n): (1, 1) for n in names if not any(k.startswith(n + ".") for k in te)})
    return discover_text_encoders(te)


def discover_layout(shapes: Mapping[str, tuple[int, ...]], unet_config: Mapping | None = None,
                    text_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Family:
    """The layout of a loaded model from its UNet keys and shapes (``{key: shape}``; checkpoint,
    ComfyUI or bare key names). `unet_config` (ComfyUI's, as `comfy.model_detection` makes it) gives
    diffusers names to a layout no table names; `text_shapes` (a CLIP state dict's shapes) gives the
    text encoders, else a table's are used when the UNet equals that table's."""
    shapes = _normalise_unet_keys(shapes)
    blocks = discover_blocks(shapes)
    if not blocks:
        kind = dit_kind(shapes)
        if kind is not None:
            projs, _ = _dit_parts(kind, shapes)
            if any(p.source == "tokens" for p in projs):
                text = discover_text_encoders(text_shapes) if text_shapes else ()
                return _dit_family(kind, shapes, text, unet_config)
        return _raise(_refusal(shapes, "it has no transformer block with a cross-attention attn2"))
    contexts = sorted({shapes[f"{UNET_PREFIX}{b.ldm}.attn2.to_k.weight"][1] for b in blocks})
    if len(contexts) != 1:
        return _raise(_refusal(shapes, f"its cross-attention blocks read text of different widths {contexts}"))
    context = int(contexts[0])
    text = discover_text_encoders(text_shapes) if text_shapes else ()
    probe = Family(CUSTOM, "", context, blocks, ())
    unet_exp = probe.expected_shapes()
    for fam in FAMILIES.values():
        exp = {k: v for k, v in fam.expected_shapes().items() if k.startswith(UNET_PREFIX)}
        if exp == unet_exp:
            if text and [(t.name, t.width, t.layers) for t in text] != \
                    [(t.name, t.width, t.layers) for t in fam.text_encoders]:
                return replace(fam, text_encoders=text)
            return fam
    if unet_config:
        try:
            named = {b.ldm: b.diffusers for b in _blocks_from_unet(unet_config)}
        except (KeyError, TypeError, IndexError, ValueError):
            named = {}
        if set(named) == {b.ldm for b in blocks}:
            blocks = tuple(replace(b, diffusers=named[b.ldm]) for b in blocks)
    adm = any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes)
    label = f"custom UNet ({len(blocks)} cross-attention blocks, text width {context})"
    return Family(CUSTOM, label, context, blocks, text, dict(unet_config or {}), native_latent=128 if adm else 64)


def _raise(err: Exception):
    raise err


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """The layout of these UNet shapes (see `discover_layout`)."""
    return discover_layout(shapes)


def layout_of_edit(family: str, keys: Mapping[str, tuple[int, ...]], encoders: Iterable[str] = ()) -> Family:
    """The layout an edit's own keys describe, for naming its keys (LoRA export, diffusers, the web
    view) without the model: the table's when `family` is one, else the blocks and text encoders the
    keys name. `encoders` lists the model's text encoders (the fingerprint records them), which decide
    kohya's ``lora_te`` vs ``lora_te1/2``."""
    if family in FAMILIES:
        return FAMILIES[family]
    shapes = dict(keys)
    kind = dit_kind(_normalise_unet_keys(shapes))
    if kind is not None:
        projs, mlps = _dit_parts(kind, _normalise_unet_keys(shapes))
        return Family(family or CUSTOM, f"{family or CUSTOM} layout", 0, (), _edit_text_encoders(shapes, encoders),
                      kind=kind, projections=projs, mlps=mlps)
    blocks = list(discover_blocks(_normalise_unet_keys(shapes)))
    seen = {b.ldm for b in blocks}
    for k, s in shapes.items():  # blocks the edit touches only outside attn2 K/V (FFN masks, LoRAs)
        m = _ANY_BLOCK.match(k)
        if m and m.group(1) not in seen and len(s) >= 1:
            seen.add(m.group(1))
            blocks.append(TransformerBlock(m.group(1), "", int(s[0])))
    blocks = tuple(sorted(blocks, key=lambda b: _execution_order(b.ldm)))
    text = _edit_text_encoders(shapes, encoders)
    ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), 0)
    return Family(family or CUSTOM, f"{family or CUSTOM} layout", int(ctx), blocks, text)


def fingerprint(family: Family, state: Mapping[str, "object"]) -> dict:
    """A base-model fingerprint: the family, a hash of the discovered layout (every editable UNet
    key and its shape), and a coarse hash of a few weight values (which checkpoint), robust to the
    dtype the model was loaded in. `state` maps ComfyUI keys to tensors (UNet keys at least)."""
    exp = {k: v for k, v in family.expected_shapes().items() if k.startswith(UNET_PREFIX)}
    layout = hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in exp.items())).encode()).hexdigest()[:16]
    probe = []
    for key in family.attn2_kv_keys()[:4] + family.ffn_out_keys()[:2] + family.projection_keys() + \
            [m.key for m in family.mlps[:2]]:
        w = state.get(key)
        if w is None:
            continue
        v = w.detach().reshape(-1)[:4096].double().abs().sum().item()
        probe.append(f"{key}={v:.3g}")
    weights = hashlib.sha256("|".join(probe).encode()).hexdigest()[:16] if probe else ""
    out = {"family": family.name, "layout": layout, "weights": weights, "layout_version": "2"}
    if family.text_encoders:
        out["encoders"] = ",".join(t.name for t in family.text_encoders)
    return out

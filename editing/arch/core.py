"""The types a model's layout is made of: transformer blocks with a cross-attention (UNets), text
encoders, the text projections and MLPs of a DiT, and `Family`, the layout of one loaded model.

Canonical keys are ComfyUI patch keys: ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``,
``diffusion_model.txt_in.weight`` and ``clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

UNET_PREFIX = "diffusion_model."

# Registries the layout types read and the modules that define the entries fill (kept here so that
# `Family` needs no import of `dit` or `tables`): DiT adapters by kind (`dit.register`), and the
# names of the layouts known by table (`tables.FAMILIES`).
ADAPTERS: dict = {}
KNOWN_NAMES: set[str] = set()
# The LoRA prefix ComfyUI's loader maps onto every CLIP weight by its own key
# (``text_encoders.qwen25_7b.transformer.model.layers.0.mlp.down_proj``, `comfy.lora.model_lora_keys_clip`):
# the only names it reads for an LLM text encoder, or for a T5 with no CLIP beside it (umT5, Pile-T5).
GENERIC_TE_LORA = "text_encoders"


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
    "t5": ComfyUI's T5 encoder (no BOS, bidirectional, ``layer.1.DenseReluDense.wo``), which Flux,
    SD3, Chroma, PixArt, AuraFlow and Wan (umT5) read; "llm": ComfyUI's Llama-family decoder
    (`comfy.text_encoders.llama`: Qwen2.5-VL, Qwen3, Gemma 2, Mistral 3, Llama 3.1; causal,
    ``model.layers.{i}.mlp.down_proj``), whose prompt sits inside a chat template (the host says
    where: `first_token` is 0 there). "fc2" below names the MLP's output Linear of any of them."""

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
        if self.kind == "llm":
            return f"model.layers.{i}"
        return f"encoder.block.{i}.layer.1" if self.kind == "t5" else f"text_model.encoder.layers.{i}"

    def fc2_module(self, i: int) -> str:
        if self.kind == "llm":
            return f"model.layers.{i}.mlp.down_proj"
        return (f"encoder.block.{i}.layer.1.DenseReluDense.wo" if self.kind == "t5"
                else f"text_model.encoder.layers.{i}.mlp.fc2")

    def fc2_key(self, i: int) -> str:
        return f"{self.name}.transformer.{self.fc2_module(i)}.weight"

    @property
    def first_token(self) -> int:
        """Index of a prompt's first real token (CLIP puts BOS before it, T5 nothing; an LLM's chat
        template is the host's to read, `Text.first_token`)."""
        return 1 if self.kind == "clip" else 0


@dataclass(frozen=True)
class TextProjection:
    """A Linear through which text enters a DiT: the closed form's layer there (Flux `txt_in`, SD3
    `context_embedder`, Qwen-Image `txt_in`, Z-Image `cap_embedder.1`, Wan `text_embedding.0`, ...).

    `source` says what it reads: ``"tokens"`` (the per-token context the CLIP gives) or ``"pooled"``
    (the pooled vector). `norm` names a module the model applies to that input first (Qwen-Image's
    `txt_norm`, Lumina's `cap_embedder.0`): the edit is solved on the normed rows, which are what the
    Linear reads."""

    module: str      # inside the diffusion model, e.g. "txt_in", "vector_in.in_layer"
    source: str      # "tokens" or "pooled"
    rows: int        # output width (the DiT's hidden size)
    cols: int        # input width (the text feature width)
    diffusers: str   # e.g. "context_embedder"; "" when no diffusers name is known
    norm: str = ""   # module applied to the input before this Linear ("" = none)

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

    name: str                      # a table's ("sd1", "flux1", ...), a DiT variant's ("qwen-image") or "custom"
    label: str
    context_dim: int
    blocks: tuple[TransformerBlock, ...]
    text_encoders: tuple[TextEncoderSpec, ...]
    unet_config: Mapping = field(default_factory=dict, hash=False, compare=False)
    native_latent: int = 64        # latent side of the native resolution (64 = 512 px)
    kind: str = "unet"             # the adapter: "unet" (attn2 cross-attention) or a DiT's (`editing.arch.dit`)
    projections: tuple[TextProjection, ...] = ()   # DiT: where the text enters
    mlps: tuple[DiTMLP, ...] = ()                  # DiT: the image-stream MLPs
    variant: str = ""              # DiT: the model within its adapter ("flux1", "flux2", "chroma", ...)

    @property
    def known(self) -> bool:
        return self.name in KNOWN_NAMES

    @property
    def is_mmdit(self) -> bool:
        """A DiT (no attn2 blocks): its text enters through `projections`, its MLPs are `mlps`."""
        return self.kind != "unet"

    @property
    def adapter(self):
        """The DiT adapter of this layout (`editing.arch.dit.DiTAdapter`); None for a UNet."""
        return ADAPTERS.get(self.kind)

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
            return "transformer." + self.adapter.diffusers_name(key[len(UNET_PREFIX):], self.label, self.variant)
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
                if te.kohya == GENERIC_TE_LORA:  # ComfyUI's own generic names (no kohya name is read there)
                    return f"{GENERIC_TE_LORA}.{key.rsplit('.weight', 1)[0]}"
                mod = key[len(p):].rsplit(".weight", 1)[0]
                return f"{te.kohya}_" + mod.replace(".", "_")
        raise KeyError(f"{key} is not in the {self.label} table")

    def to_kohya_diffusers_style(self, key: str) -> str:
        """ComfyUI UNet key -> kohya name in the diffusers style (``lora_unet_down_blocks_0_...``)."""
        d = self.to_diffusers(key)
        if d.startswith("unet."):
            return "lora_unet_" + d[len("unet."):].rsplit(".weight", 1)[0].replace(".", "_")
        return self.to_kohya(key)



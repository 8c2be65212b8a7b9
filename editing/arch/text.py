"""Text encoders as ComfyUI's CLIP objects hold them (``clip_l``, ``clip_g``, ``t5xxl``, ``umt5xxl``,
the LLMs ``qwen25_7b``, ``qwen3_4b``, ``gemma2_2b``, ``mistral3_24b``, ``llama``): the tables that name
them for kohya, diffusers and EMCID, and their discovery from a CLIP's keys."""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

from .core import GENERIC_TE_LORA, TextEncoderSpec

CLIP_L = TextEncoderSpec("clip_l", 768, 12, 3072, "text_encoder", "lora_te",
                         "cond_stage_model.transformer.", edit_layers=tuple(range(0, 11)))
CLIP_H = TextEncoderSpec("clip_h", 1024, 24, 4096, "text_encoder", "lora_te",
                         "cond_stage_model.model.", edit_layers=tuple(range(0, 22)))
CLIP_L_XL = TextEncoderSpec("clip_l", 768, 12, 3072, "text_encoder", "lora_te1",
                            "conditioner.embedders.0.transformer.", edit_layers=(8, 9, 10))
CLIP_G = TextEncoderSpec("clip_g", 1280, 32, 5120, "text_encoder_2", "lora_te2",
                         "conditioner.embedders.1.model.", edit_layers=(26, 27, 28, 29, 30))

TINY_CLIP = TextEncoderSpec("clip_l", 64, 4, 256, "text_encoder", "lora_te",
                            "cond_stage_model.transformer.", edit_layers=(0, 1, 2))

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


def t5_edit_layers(layers: int) -> tuple[int, ...]:
    """EMCID's default layers on a T5 no table names (umT5-XXL, Pile-T5-XL): T5-XXL's choice scaled to
    its depth, layers from a quarter of the way in (6..10 of 24), early enough for the later layers to
    carry the edited word's state to the rest of the sequence (see T5_XXL above)."""
    first = round(layers / 4)
    return tuple(range(first, min(layers, first + max(1, round(5 * layers / 24)))))


def llm_edit_layers(read: int) -> tuple[int, ...]:
    """EMCID's default layers on a causal LLM encoder whose layer `read` is the last one the diffusion
    model reads (an edit after it changes nothing): MEMIT's band of early-middle MLPs, which it found
    to hold what a causal LM recalls about a subject at the subject's last token (GPT-J 3..8 of 28,
    Llama-3-8B 4..8 of 32), here 10 %..30 % of the layers up to `read` (Qwen2.5-VL 7B read at its
    last layer: 2..8; Qwen3-4B at its 35th of 36: 3..10; Mistral 3's layers read up to the 30th:
    3..8). Chosen by that reasoning, not measured on these models."""
    n = int(read) + 1
    first = n // 10
    return tuple(range(first, max(first, math.ceil(0.3 * n) - 1) + 1))


_TE_FC2 = re.compile(r"^(\w+)\.transformer\.(?:text_model\.encoder\.layers\.(\d+)\.mlp\.fc2"
                     r"|encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo"
                     r"|model\.layers\.(\d+)\.mlp\.down_proj)\.weight$")
_KIND_ORDER = {"clip": 0, "t5": 1, "llm": 2}


def discover_text_encoders(shapes: Mapping[str, tuple[int, ...]]) -> tuple[TextEncoderSpec, ...]:
    """The text encoders of a ComfyUI CLIP state dict (``clip_l.transformer...``, ``t5xxl.transformer...``,
    ``qwen25_7b.transformer.model.layers...``) in ComfyUI's order (CLIP-L, the other CLIPs, T5, the
    LLMs last), with the names kohya, diffusers and EMCID's default layers take from the tables when
    an encoder matches. A CLIP without any CLIP encoder (T5 alone, an LLM) gets ComfyUI's generic
    LoRA names, the only ones its loader maps there."""
    found: dict[str, dict[int, tuple[int, ...]]] = {}
    kinds: dict[str, str] = {}
    for key, shape in shapes.items():
        m = _TE_FC2.match(key)
        if m and len(shape) == 2:
            found.setdefault(m.group(1), {})[int(m.group(2) or m.group(3) or m.group(4))] = tuple(shape)
            kinds[m.group(1)] = "clip" if m.group(2) is not None else "t5" if m.group(3) is not None else "llm"
    names = sorted(found, key=lambda n: (_KIND_ORDER[kinds[n]], n != "clip_l", n))
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
        if not clips or kinds[name] == "llm":
            kohya = GENERIC_TE_LORA
        diffusers = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        if kinds[name] == "t5":
            tables: tuple[TextEncoderSpec, ...] = _T5_TABLES
        elif kinds[name] == "llm":
            tables = ()
        else:  # beside a second CLIP, CLIP-L is SDXL's (EMCID edits its late layers there)
            tables = (CLIP_L_XL, CLIP_G) if len(clips) > 1 else _TABLE_ENCODERS
        table = [t for t in tables if (t.name, t.width, t.layers, t.mlp) == (name, width, n, mlp)]
        if not table and kinds[name] == "t5":  # a T5 of T5-XXL's or the tiny T5's shape under another name (umT5)
            table = [t for t in tables if (t.width, t.layers, t.mlp) == (width, n, mlp)]
        # EMCID edits the early-to-late fc2 layers: the table's choice when known, else all but the last
        # (T5: its early band; an LLM: MEMIT's band, narrowed by the host to the layers the model reads)
        edit = (table[0].edit_layers if table else t5_edit_layers(n) if kinds[name] == "t5"
                else llm_edit_layers(n - 1) if kinds[name] == "llm" else tuple(range(max(n - 1, 1))))
        a1111 = table[0].a1111 if table else ""
        out.append(TextEncoderSpec(name, int(width), n, int(mlp), diffusers, kohya, a1111, edit_layers=edit,
                                   kind=kinds[name]))
    return tuple(out)


def _placeholder_fc2(name: str) -> str:
    """A key of encoder `name` (for naming encoders an edit does not touch)."""
    kind = "clip" if name.startswith("clip_") else "t5" if "t5" in name else "llm"
    spec = TextEncoderSpec(name, 1, 1, 1, "", "", "", kind=kind)
    return spec.fc2_key(0)


def _edit_text_encoders(shapes: Mapping[str, tuple[int, ...]], encoders: Iterable[str]) -> tuple[TextEncoderSpec, ...]:
    """The text encoders an edit's keys name, with the model's other encoders (`encoders`, from the
    fingerprint) added, since every encoder decides kohya's ``lora_te`` numbering."""
    te = {k: s for k, s in shapes.items() if _TE_FC2.match(k)}
    names = list(encoders) or sorted({m.group(1) for k in te if (m := _TE_FC2.match(k))})
    te.update({_placeholder_fc2(n): (1, 1) for n in names if not any(k.startswith(n + ".") for k in te)})
    return discover_text_encoders(te)

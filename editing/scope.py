"""Which weights an edit may change, by method: an edit that claims one method and touches other
layers, or carries tensors no method writes, is refused before anything is applied.

Scopes are module-name patterns over ComfyUI patch keys (``diffusion_model.<any path>.attn2.to_k.weight``,
``<encoder>.transformer.text_model.encoder.layers.<i>.mlp.fc2.weight``), never a list of blocks, so
every SpatialTransformer UNet passes whatever its layout.

- ``uce``: the UNet's ``attn2.to_k`` / ``attn2.to_v`` weights, or a DiT's text projections (each
  adapter's in `editing.arch`: Flux ``txt_in``, ``vector_in.in_layer``; SD3 ``context_embedder``,
  ``y_embedder.mlp.0``; Qwen-Image ``txt_in``; ...); lowrank or delta.
- ``concept_prune``, ``structured-prune`` (a bench baseline): the UNet's ``ff.net.2`` weights, or a
  DiT's MLP outputs (each adapter's: Flux ``img_mlp.2`` / single blocks' ``linear2``, SD3
  ``x_block.mlp.fc2``, ...); mask.
- ``emcid``: the text encoders' MLP output weights (CLIP ``mlp.fc2``, T5 ``DenseReluDense.wo``, an LLM
  encoder's ``model.layers.<i>.mlp.down_proj``); lowrank or delta.
- ``unlearn-rgd``, ``unlearn-ga``, ``unlearn-esd``, ``distill``, ``distill-unlearn``,
  ``benign-finetune``: the parameter set recorded in ``params["param_set"]``, as
  `editing.training.select_targets` picks it: ``lora`` = the Linear weights inside
  ``transformer_blocks``; ``lora-xattn``, ``xattn`` = the Linear ``attn2.*`` weights; ``noxattn`` =
  the Linear/Conv weights outside ``attn2``, ``time_embed``, ``label_emb`` and ``out``; lowrank or
  delta (LoRA slots fold back as lowrank, full slots as delta).
- ``model-difference`` (`comfy_host.jobs.edit_between`): any UNet weight, delta only; it is the
  difference of two whole models, so it has no narrower scope.
- ``a+b`` (`editing.edit.combine`): the union of its parts' scopes, the parts read from
  ``params["combined"]`` (with their own params), else from the name.

Weight changes (delta, up, down) must be float16/bfloat16/float32/float64; mask indices int32/int64.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .arch.dit import ADAPTERS
from .errors import EditFileError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_PATH = r"(?:[A-Za-z0-9_]+\.)*"      # any dotted module path (possibly empty)
_UNET = r"diffusion_model\."
_WEIGHTS = frozenset({"lowrank", "delta"})


@dataclass(frozen=True)
class Rule:
    what: str                              # for messages
    pattern: str                           # matches the whole key
    kinds: frozenset
    ndims: tuple[int, ...] | None = (2,)   # weight ranks allowed (None: any)

    def matches(self, key: str, shape: tuple[int, ...]) -> bool:
        return re.fullmatch(self.pattern, key) is not None and (self.ndims is None or len(shape) in self.ndims)


KV = Rule("the UNet's cross-attention attn2.to_k / attn2.to_v weights",
          _UNET + _PATH + r"attn2\.to_[kv]\.weight", _WEIGHTS)
TEXT_IN = Rule("a DiT's text projections (Flux txt_in / vector_in.in_layer, SD3 context_embedder / y_embedder.mlp.0, "
               "Qwen-Image txt_in, Lumina / Z-Image cap_embedder.1, Wan text_embedding.0, ...)",
               _UNET + r"(?:" + "|".join(sorted({re.escape(r.module) for a in ADAPTERS.values() for r in a.projections}))
               + r")\.weight", _WEIGHTS)
FFN_OUT = Rule("the UNet's FFN output ff.net.2 weights", _UNET + _PATH + r"ff\.net\.2\.weight", frozenset({"mask"}))
TE_FC2 = Rule("the text encoders' MLP output weights (CLIP mlp.fc2, T5 layer.1.DenseReluDense.wo, LLM "
              "model.layers.N.mlp.down_proj)",
              r"(?!diffusion_model\.)" + _PATH + r"(?:text_model\.encoder\.layers\.\d+\.mlp\.fc2"
              r"|encoder\.block\.\d+\.layer\.1\.DenseReluDense\.wo"
              r"|transformer\.model\.layers\.\d+\.mlp\.down_proj)\.weight", _WEIGHTS)
DIT_MLP_OUT = Rule("a DiT's MLP output weights (Flux double_blocks.N.img_mlp.2 / single_blocks.N.linear2, SD3 "
                   "joint_blocks.N.x_block.mlp.fc2, and each DiT adapter's MLPs)",
                   _UNET + r"(?:" + "|".join(r.pattern for a in ADAPTERS.values() for r in a.mlps) + r")\.weight",
                   frozenset({"mask"}))
UNET_ANY = Rule("any UNet weight", _UNET + r".+", frozenset({"delta"}), ndims=None)

# What `editing.training.select_targets` trains for each parameter set, as key patterns. Linear
# weights are 2-D, Conv2d weights 4-D; norm layers (1-D) are never trained.
_DIT_BLOCK = _UNET + r"(?:" + "|".join(sorted({re.escape(p) for a in ADAPTERS.values() for p in a.blocks})) + r")\d+\."
_DIT_ATTN = r"(?:" + "|".join(a.attention for a in ADAPTERS.values() if a.attention) + r")\.weight"
# The same parameter sets on a DiT, as `editing.training._dit_target` picks them with its adapter.
DIT_PARAM_SET_RULES: dict[str, Rule] = {
    "lora": Rule("the Linear weights inside an MMDiT's blocks (parameter set 'lora')",
                 _DIT_BLOCK + _PATH + r"[A-Za-z0-9_]+\.weight", _WEIGHTS),
    "lora-xattn": Rule("an MMDiT's joint-attention qkv/proj weights (parameter set 'lora-xattn')",
                       _UNET + _DIT_ATTN, _WEIGHTS),
    "xattn": Rule("an MMDiT's joint-attention qkv/proj weights (parameter set 'xattn')", _UNET + _DIT_ATTN, _WEIGHTS),
    "noxattn": Rule("the Linear weights of an MMDiT's blocks outside the joint attention (parameter set 'noxattn')",
                    r"(?!" + _UNET + _DIT_ATTN + r")" + _DIT_BLOCK + _PATH + r"[A-Za-z0-9_]+\.weight", _WEIGHTS),
}
PARAM_SET_RULES: dict[str, Rule] = {
    "lora": Rule("the Linear weights inside the UNet's transformer_blocks (parameter set 'lora')",
                 _UNET + _PATH + r"transformer_blocks\.\d+\." + _PATH + r"[A-Za-z0-9_]+\.weight", _WEIGHTS),
    "lora-xattn": Rule("the UNet's cross-attention attn2.* Linear weights (parameter set 'lora-xattn')",
                       _UNET + _PATH + r"attn2\." + _PATH + r"[A-Za-z0-9_]+\.weight", _WEIGHTS),
    "xattn": Rule("the UNet's cross-attention attn2.* Linear weights (parameter set 'xattn')",
                  _UNET + _PATH + r"attn2\." + _PATH + r"[A-Za-z0-9_]+\.weight", _WEIGHTS),
    "noxattn": Rule("the UNet's Linear/Conv weights outside attn2, time_embed, label_emb and out (parameter set "
                    "'noxattn')", _UNET + r"(?!time_embed\.|out\.|label_emb\.)(?!.*\.attn2\.)" + _PATH
                    + r"[A-Za-z0-9_]+\.weight", _WEIGHTS, ndims=(2, 4)),
}

FIXED_SCOPES: dict[str, tuple[Rule, ...]] = {
    "uce": (KV, TEXT_IN),
    "concept_prune": (FFN_OUT, DIT_MLP_OUT),
    "structured-prune": (FFN_OUT, DIT_MLP_OUT),   # bench baseline: whole ff.net.2 columns by norm
    "emcid": (TE_FC2,),
    "model-difference": (UNET_ANY,),
}
TRAINED_METHODS = ("unlearn-rgd", "unlearn-ga", "unlearn-esd", "distill", "distill-unlearn", "benign-finetune")


def known_methods() -> list[str]:
    return sorted(FIXED_SCOPES) + list(TRAINED_METHODS)


def _src(source: str) -> str:
    return f"{source}: " if source else ""


def rules_for(method: str, params: Any = None, source: str = "") -> tuple[Rule, ...]:
    """The rules an edit of `method` (with its recorded `params`) may use. Raises for unknown methods."""
    params = params if isinstance(params, Mapping) else {}
    if not isinstance(method, str) or not method:
        raise EditFileError(f"{_src(source)}the edit names no method; ConceptEdit applies only edits of its own "
                            f"methods ({', '.join(known_methods())}). Recompute it with a ConceptEdit node.")
    if "+" in method:
        parts = params.get("combined")
        if isinstance(parts, list) and parts and all(isinstance(p, Mapping) for p in parts) and \
                "+".join(str(p.get("method")) for p in parts) == method:
            pairs = [(str(p.get("method")), p.get("params")) for p in parts]
        else:
            pairs = [(m, None) for m in method.split("+")]
        out: list[Rule] = []
        for m, p in pairs:
            out.extend(r for r in rules_for(m, p, source) if r not in out)
        return tuple(out)
    if method in FIXED_SCOPES:
        return FIXED_SCOPES[method]
    if method in TRAINED_METHODS:
        ps = params.get("param_set")
        if ps is None:
            raise EditFileError(f"{_src(source)}this {method} edit does not record which parameter set it trained "
                                f"(params.param_set: one of {', '.join(PARAM_SET_RULES)}), so its scope cannot be "
                                "checked; nothing was applied. Recompute it with this ConceptEdit, which records it.")
        if ps not in PARAM_SET_RULES:
            raise EditFileError(f"{_src(source)}this {method} edit records the unknown parameter set {ps!r} "
                                f"(known: {', '.join(PARAM_SET_RULES)}); nothing was applied. Recompute it with this "
                                "ConceptEdit.")
        return (PARAM_SET_RULES[ps], DIT_PARAM_SET_RULES[ps])
    raise EditFileError(f"{_src(source)}unknown edit method {method!r}: ConceptEdit applies only edits of its own "
                        f"methods ({', '.join(known_methods())}); nothing was applied. A file from a newer ConceptEdit "
                        "needs the pack updated; a LoRA file goes through ComfyUI's LoraLoader.")


def tensor_problem(kind: str, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What is wrong with the dtypes of a change's tensors, or None."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"its {name!r} entry is a {type(t).__name__}, not a tensor"
        if name == "index":
            if t.dtype not in INDEX_DTYPES:
                return (f"its mask index is {t.dtype}; a mask stores the flat positions of the pruned weights as an "
                        "int32/int64 tensor. Re-save the mask with integer indices (recompute it with ConceptPrune)")
        elif t.dtype not in FLOAT_DTYPES:
            return (f"its {name!r} tensor is {t.dtype}; weight changes are float16, bfloat16, float32 or float64 "
                    "(an integer or float8 change is quantised, not an edit). Re-save it from the float edit")
    return None


def check_scope(method: str, params: Any, changes: Mapping[str, Any], source: str = "") -> None:
    """Raise EditFileError unless every change is a key, kind, rank and dtype the method writes."""
    rules = rules_for(method, params, source)
    what = "; ".join(r.what for r in rules)
    for key, change in changes.items():
        problem = tensor_problem(change.kind, change.tensors)
        if problem:
            raise EditFileError(f"{_src(source)}{key} in this {method} edit: {problem}. Nothing was applied.")
        shape = tuple(change.shape)
        ok = [r for r in rules if r.matches(key, shape)]
        if not ok:
            raise EditFileError(
                f"{_src(source)}this {method} edit changes {key} (shape {shape}), which is outside what {method} "
                f"edits ({what}); nothing was applied. The file is damaged or mislabelled: recompute the edit with "
                "ConceptEdit, or stack edits of different methods with editing.edit.combine so its method names "
                "every part.")
        kinds = set().union(*(r.kinds for r in ok))
        if change.kind not in kinds:
            raise EditFileError(
                f"{_src(source)}this {method} edit holds a {change.kind} change of {key}, but {method} writes only "
                f"{'/'.join(sorted(kinds))} changes there; nothing was applied. Recompute the edit with ConceptEdit.")

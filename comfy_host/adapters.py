"""ComfyUI MODEL/CLIP -> the library's host interfaces (`editing.hosts`), and Edit -> patches.

Everything here runs inside ComfyUI (or a headless ComfyUI from `locate.ensure_comfy`). The input
ModelPatcher/CLIP objects are never modified: edits go onto clones as patches.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch

from ..editing.arch import Family, clip_hint, discover_layout, fingerprint
from ..editing.diffusion import sampling_cfg
from ..editing.edit import Edit
from ..editing.errors import ConceptEditError, InvalidInputError
from ..editing.hosts import RunContext
from .quantized import FloatWeights, dequantized, is_quantized

log = logging.getLogger(__name__)
# the guidance a guidance-distilled Flux (Flux-dev) is run at: ComfyUI's default, as its FluxGuidance node
FLUX_GUIDANCE = 3.5



# ---- progress and cancel -------------------------------------------------------------------
def run_context(total_hint: int | None = None) -> RunContext:
    """A RunContext wired to ComfyUI's progress bar and its Cancel button."""
    import comfy.model_management as mm
    import comfy.utils

    bars: dict[int, object] = {}

    def progress(done: int, total: int) -> None:
        bar = bars.get(total)
        if bar is None:
            bar = bars[total] = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    def should_stop() -> bool:
        # raises ComfyUI's own InterruptProcessingException, which its executor reports as "interrupted"
        mm.throw_exception_if_processing_interrupted()
        return False

    return RunContext(progress=progress, should_stop=should_stop, device=mm.get_torch_device())


# ---- weights ---------------------------------------------------------------------------------
def stored_weights(patcher) -> dict[str, torch.Tensor]:
    """Key -> the *unpatched* weight as ComfyUI stores it (float, float8, a QuantizedTensor, a GGUF
    tensor; a loaded clone may have patched weights in place, whose originals are in its backup)."""
    import comfy.utils
    sd = patcher.model_state_dict()
    backup = getattr(patcher, "backup", None) or {}
    out = {}
    for k, w in sd.items():
        b = backup.get(k)
        if b is not None:
            out[k] = getattr(b, "weight", b)
        elif w.device.type == "meta":
            # ComfyUI-GGUF's layers put meta stand-ins in the state dict (for memory estimates); the
            # packed weight is the module's own parameter, unpatched (its patches ride beside it)
            try:
                out[k] = comfy.utils.get_attr(patcher.model, k)
            except AttributeError:  # a stand-in with no parameter behind it ("temp.weight")
                continue
        else:
            out[k] = w
    return out


def original_weights(patcher) -> FloatWeights:
    """Key -> the *unpatched* weight as a float tensor: as stored when float16/bfloat16/float32,
    dequantized exactly on each read when stored quantized (`quantized.FloatWeights`, which keeps the
    stored tensors for applying)."""
    return FloatWeights(stored_weights(patcher))


def model_family(model, clip=None) -> Family:
    """The layout read from this MODEL (and its CLIP's text encoders when given): its keys and
    shapes, with ComfyUI's own UNet config for diffusers names when no table names the layout."""
    # logical shapes of the stored weights (a GGUF tensor's packed shape is not its weight's)
    shapes = FloatWeights(stored_weights(model)).shapes()
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    text = {k: tuple(v.shape) for k, v in clip.patcher.model_state_dict().items()} if clip is not None else None
    return discover_layout(shapes, unet_config=config, text_shapes=text)


def model_fingerprint(model) -> dict:
    return fingerprint(model_family(model), original_weights(model))


def clip_state(clip) -> FloatWeights:
    return original_weights(clip.patcher)


def apply_edit(model, clip, edit: Edit, strength: float = 1.0, strict_weights: bool = False):
    """Clone MODEL (and CLIP when the edit touches the text encoder) and add the edit as patches.

    Returns (model', clip', warnings). Checks the edit's scope (`editing.scope`), the family, layout
    and every key's shape before anything is applied; raises if any key fails to match (never a
    silent no-op). Patches are in the running ComfyUI's own form (`edit_patches`)."""
    from .view import ModelView
    return ModelView(model, clip).apply(edit, strength, strict_weights=strict_weights)


def add_edit_patches(model, clip, edit: Edit, unet_w: Mapping[str, torch.Tensor], te_w: Mapping[str, torch.Tensor],
                     strength: float = 1.0):
    """(model', clip'): clones carrying `edit` as patches (an input is returned as it is when the
    edit has no key of it); `unet_w`/`te_w` are the unpatched weights masks are resolved against.
    Every patch must match a key, else nothing is returned. At strength 0 the clones carry no patch,
    as ComfyUI's LoraLoader adds none: a weight stored in float8 would otherwise be rounded again
    (stochastically in current ComfyUI, which moves some exact values by a step)."""
    patches = edit_patches(edit, {k: (te_w[k] if k in te_w else unet_w[k]) for k in edit.changes})
    unet_patches = {k: p for k, p in patches.items() if k not in te_w}
    te_patches = {k: p for k, p in patches.items() if k in te_w}
    if strength == 0:
        return (model.clone() if unet_patches else model), (clip.clone() if te_patches else clip)
    out_model, out_clip = model, clip
    if unet_patches:
        out_model = model.clone()
        got = set(out_model.add_patches(unet_patches, strength))
        _check_matched(unet_patches, got, "MODEL")
    if te_patches:
        out_clip = clip.clone()
        got = set(out_clip.add_patches(te_patches, strength))
        _check_matched(te_patches, got, "CLIP")
    return out_model, out_clip


def patched_weights(patcher, keys: Sequence[str], base: Mapping[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Key -> the weight this MODEL computes with (its unpatched weight plus its own patches), in
    float32, by ComfyUI's own patch arithmetic, whatever is loaded where: a low-VRAM load keeps some
    modules unpatched and patches them per forward, so reading module weights would mix the two."""
    import comfy.lora
    base = base if base is not None else original_weights(patcher)
    calc = getattr(comfy.lora, "calculate_weight", None)  # current ComfyUI; 2024 has the patcher method
    out = {}
    for k in keys:
        w = base[k].detach().to(device="cpu", dtype=torch.float32, copy=True)
        ps = patcher.patches.get(k)
        if ps:
            w = calc(ps, w, k) if calc is not None else patcher.calculate_weight(ps, w, k)
        out[k] = w
    return out


_PATCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _module_name(key: str) -> str:
    return key[:-len(".weight")] if key.endswith(".weight") else key


def edit_state_dict(edit: Edit, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(kohya-style state dict, key map) of `edit` for `comfy.lora.load_lora`: per changed key a
    module named after the key, low-rank changes as ``lora_up``/``lora_down`` with ``alpha`` = rank
    (scale 1), dense deltas as ``diff`` (their own float dtype, never the weight's), masks as a
    sparse COO ``diff`` of −W⊙M. `weights` maps each changed key to its base weight as a float tensor
    (masks need its values; a quantized one is dequantized here; nothing else is read).

    Weights stored quantized take the same patches as a LoRA: ComfyUI adds W + ΔW in float32 and
    stores the sum back in the weight's type (float8 and scaled fp8 rounded, stochastically in
    current versions; a QuantizedTensor re-quantized; GGUF patched at each forward), so the edit
    arrives less what that rounding loses (`quantized.rounding_per_layer` measures it)."""
    sd: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    for key, change in edit.changes.items():
        base = weights[key]
        if change.kind == "mask" and is_quantized(base):
            base = dequantized(base)
        name = _module_name(key)
        if name in key_map:
            raise InvalidInputError(f"two keys of the edit name the module {name}")
        key_map[name] = key
        if change.kind == "lowrank":
            up, down = change.tensors["up"], change.tensors["down"]
            sd[f"{name}.lora_up.weight"] = up if up.dtype in _PATCH_FLOATS else up.float()
            sd[f"{name}.lora_down.weight"] = down if down.dtype in _PATCH_FLOATS else down.float()
            sd[f"{name}.alpha"] = torch.tensor(float(up.shape[1]))  # the loader's scale alpha / rank = 1
        elif change.kind == "mask":
            # −W⊙M as a sparse COO diff: memory O(pruned weights), not O(layer) (SDXL has 70 1280×5120
            # layers); its values are the weights themselves, so W + ΔW is exactly 0 where pruned.
            sd[f"{name}.diff"] = change.sparse_delta(base).to(device="cpu")
        else:
            d = change.tensors["delta"]
            sd[f"{name}.diff"] = d if d.dtype in _PATCH_FLOATS else d.float()
    return sd, key_map


def edit_patches(edit: Edit, weights: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """`edit` as ComfyUI patches keyed by patch key, made by the running ComfyUI's own LoRA loader
    (`comfy.lora.load_lora`, the route LoraLoader takes): ("lora", …) tuples in the 2024 copy,
    `comfy.weight_adapter` objects in current ComfyUI. Low-rank changes stay low-rank (an SDXL rank-4
    LoRA is never expanded to its dense ΔW); ComfyUI multiplies them out per weight when it loads the
    model, in float32, and rounds the sum once to the weight's dtype."""
    import comfy.lora
    sd, key_map = edit_state_dict(edit, weights)
    patches = comfy.lora.load_lora(sd, key_map)
    missing = [k for k in key_map.values() if k not in patches]
    if missing:
        raise ConceptEditError(f"ComfyUI's LoRA loader turned {len(missing)} of the edit's {len(key_map)} changes "
                               f"into no patch (first: {missing[0]}); nothing was applied")
    return patches


def _check_matched(patches: Mapping, got: set, what: str) -> None:
    missing = [k for k in patches if k not in got]
    if missing:
        raise ConceptEditError(f"{len(missing)} of {len(patches)} keys of the edit matched nothing in the {what} "
                               f"(first: {missing[0]}); nothing was applied")


# ---- text ----------------------------------------------------------------------------------------
# Two prompts a ComfyText reads once to learn its CLIP's context layout (`ComfyText._runs`): their
# tokens against the empty prompt's show the template around the user's text, and since the second
# extends the first, the rows before the words they differ in show whether the encoder is causal.
_PROBES = ("a photo of a cat", "a photo of a cat on a chair")
# prompts whose extras a ComfyText keeps for `extras_for` (one HiDream prompt's Llama states are ~32 MB);
# an older one is encoded again when asked for
_KEEP_EXTRAS = 64
# Contexts of their own lengths are padded to a multiple of this many rows by `encode`, so that contexts
# encoded in separate calls (a batch's prompts, then "") stack and concatenate as CLIP's and T5's do;
# Flux.2's model pads every context to this itself (`model_base.Flux2`). The denoiser runs the model on
# a batch's rows without the padding all its prompts share (`ComfyText.extras_for`).
_ROWS_MULTIPLE = 512


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pad_rows(t: torch.Tensor, rows: int, left: bool) -> torch.Tensor:
    """`t` [b, n, ...] with zero rows added before (left) or after its n rows, up to `rows`."""
    extra = rows - t.shape[1]
    if extra <= 0:
        return t
    zeros = t.new_zeros((t.shape[0], extra) + tuple(t.shape[2:]))
    return torch.cat([zeros, t] if left else [t, zeros], dim=1)


def _cat_padded(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One batch of per-prompt tensors [1, ...]; any of their other dimensions that differ are padded
    with zeros at the end to the largest."""
    shape = [max(t.shape[i] for t in ts) for i in range(1, ts[0].ndim)]
    out = []
    for t in ts:
        pad = []
        for i in reversed(range(1, t.ndim)):
            pad += [0, shape[i - 1] - t.shape[i]]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(out)


class ComfyText:
    """`editing.hosts.TextEncoder` over a ComfyUI CLIP.

    Which context row each token of a prompt becomes is read off the CLIP (`_runs`), not assumed. CLIP
    and T5 give every prompt a context of one length (77 CLIP rows, T5 padded), token i at row i. The
    LLM encoders of current ComfyUI wrap the prompt in a chat template, some drop the template's first
    tokens from the context (Qwen-Image, HunyuanImage 2.1), and every prompt's context has its own
    length. A batch of such prompts is one tensor: each context padded with zero rows on the side its
    tokenizer pads, every prompt's rows exactly its own encode (`encode_with_pooled`). What the CLIP
    returns besides the context (attention masks, HiDream's Llama states) goes with it: batched in
    `conditioning`, and found again for a context on the denoiser's path (`extras_for`)."""

    def __init__(self, clip, device=None):
        if clip is None:
            raise InvalidInputError("connect a CLIP")
        self.clip = clip
        self.device = device
        import inspect
        try:  # current ComfyUI returns a CLIP's extra outputs (attention masks, HiDream's Llama states) in a dict
            self._dict = "return_dict" in inspect.signature(clip.encode_from_tokens).parameters
        except (TypeError, ValueError):
            self._dict = False
        self._fps: dict[str, torch.Tensor] = {}  # prompt -> its rows' fingerprint (`extras_for`)
        self._fp_groups: dict[int, tuple[list[str], torch.Tensor]] | None = None
        self._extras: dict[str, dict] = {}  # the last _KEEP_EXTRAS prompts' extras, oldest first
        # the context layout, read by `_runs`
        self._varies, self._drop, self._causal, self._pad_left = False, 0, None, False

    def _from_tokens(self, tokens) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(context, pooled, extras): what the CLIP returns besides the two (empty on the 2024 ComfyUI)."""
        if not self._dict:
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            return cond, pooled, {}
        out = dict(self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True))
        cond, pooled = out.pop("cond"), out.pop("pooled_output", None)
        return cond, pooled, {k: v for k, v in out.items() if v is not None}

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        tokens = self.clip.tokenize(prompt)
        cond, pooled, extras = self._from_tokens(tokens)
        length, runs = self._runs()
        if self._varies:
            chunks = tokens[runs[0][0]]
            rows = sum(len(c) for c in chunks) - self._drop
            if len(chunks) != 1 or cond.shape[1] != rows:
                raise ConceptEditError(
                    f"this CLIP gave {cond.shape[1]} context rows for a prompt of {rows} tokens (past the "
                    f"{self._drop} template tokens it leaves out for the empty prompt), so its token rows "
                    f"cannot be named: {prompt[:60]!r}")
        elif cond.shape[1] > length:
            log.warning("prompt longer than the context (%d tokens) is cut to its first %d: %r", length, length,
                        prompt[:60])
            # each run keeps the empty prompt's share of rows (SD3: CLIP's 77, then T5's 77)
            parts, at = [], 0
            for k, _, _ in runs:
                parts.append((at, self._run_rows[k]))
                at += sum(len(chunk) for chunk in tokens[k])
            cond = torch.cat([cond[:, a:a + n] for a, n in parts], dim=1)
            mask = extras.get("attention_mask")
            if torch.is_tensor(mask) and mask.ndim == 2 and mask.shape[1] >= at:
                extras = {**extras, "attention_mask": torch.cat([mask[:, a:a + n] for a, n in parts], dim=1)}
        return cond, pooled, extras

    def _runs(self) -> tuple[int, list[tuple[str, int, int]]]:
        """(context length of the empty prompt, [(tokenizer key, first token of the prompt's own text,
        EOS id)]): which encoders' tokens make up the context rows, in order. SD1/SD2/SDXL: the CLIP's
        77 positions (SDXL's two encoders share them); Flux: T5's (no BOS); SD3: CLIP's then T5's; the
        LLM encoders: their one run, template included.

        All read off the CLIP. The run layout: from the empty prompt's context length. Where the
        prompt's own tokens start: where the empty prompt's tokens and those of two probes first
        differ (1 after CLIP's BOS, 0 for T5, after the chat template's prefix for an LLM). The EOS:
        the first token the empty prompt has there (CLIP's and T5's end token; the first template
        token after the text, e.g. Qwen's <|im_end|>; none, -1, when nothing follows, as with
        Lumina 2's bare Gemma). Whether contexts have one length: a probe's context length; where
        they do not, the template tokens the encoder drops from the front (Qwen-Image's system
        prompt) are the empty prompt's tokens less its rows, and whether the encoder is causal is
        read from the rows two probes share."""
        cached = getattr(self, "_runs_cache", None)
        if cached is not None:
            return cached
        tokens = self.clip.tokenize("")
        cond, pooled, _ = self._from_tokens(tokens)
        length = int(cond.shape[1])
        self._width = int(cond.shape[-1])
        self._pooled_width = int(pooled.shape[-1]) if pooled is not None else 0
        sizes = {k: len(v[0]) for k, v in tokens.items()}
        clip_key = next((k for k in ("l", "g", "h") if k in sizes), None)
        t5_key = next((k for k in sizes if k not in ("l", "g", "h")), None)
        order = [[clip_key], [t5_key], [clip_key, t5_key]]
        chosen = next((o for o in order if None not in o and sum(sizes[k] for k in o) == length),
                      [clip_key or sorted(sizes)[0]])
        # the context rows each run fills for the empty prompt (a layout no rule matches: all of them)
        self._run_rows = ({k: sizes[k] for k in chosen} if sum(sizes[k] for k in chosen) == length
                          else {chosen[0]: length})
        probes = [self.clip.tokenize(p) for p in _PROBES]
        runs = []
        for k in chosen:
            ids = [int(t[0]) for t in tokens[k][0]]
            start = min(_common_prefix(ids, [int(t[0]) for t in p[k][0]]) for p in probes)
            runs.append((k, start, ids[start] if start < len(ids) else -1))
        self._varies, self._drop, self._causal, self._pad_left = False, 0, None, False
        k = chosen[0]
        ids = [int(t[0]) for t in tokens[k][0]]
        pad = self._pad_id(k)
        # a run that ends in padding is one fixed length (CLIP's 77, T5's minimum): no probe to encode
        if len(chosen) == 1 and not (pad is not None and len(ids) > runs[0][1] + 1 and ids[-1] == pad):
            first = self._from_tokens(probes[0])[0]
            if first.shape[1] != length:
                self._read_varying(k, runs[0][1], sizes[k] - length, length, probes, first)
        self._runs_cache = (length, runs)
        return self._runs_cache

    def _tokenizer(self, key: str):
        return getattr(self.clip.tokenizer, f"clip_{key}", None) or getattr(self.clip.tokenizer, key, None)

    def _pad_id(self, key: str) -> int | None:
        """The id the tokenizer of run `key` pads with (the 2024 ComfyUI names it only by `pad_with_end`)."""
        tok = self._tokenizer(key)
        pad = getattr(tok, "pad_token", None)
        if pad is None and hasattr(tok, "pad_with_end"):
            pad = getattr(tok, "end_token", None) if tok.pad_with_end else 0
        return int(pad) if isinstance(pad, int) else None

    def _read_varying(self, key: str, start: int, drop: int, length: int, probes, first: torch.Tensor) -> None:
        """The layout of a CLIP whose contexts have the prompt's own length: `drop` tokens in front
        that no row holds, the side its tokenizer pads a batch on, and whether it is causal."""
        n = len(probes[0][key][0])
        if drop < 0 or drop > start or n - drop != first.shape[1]:
            raise ConceptEditError(
                f"this CLIP's contexts have no fixed length and its token rows cannot be named: the empty "
                f"prompt has {length} rows for {length + drop} tokens, {_PROBES[0]!r} {first.shape[1]} for "
                f"{n} tokens")
        self._varies, self._drop = True, drop
        self._pad_left = bool(getattr(self._tokenizer(key), "pad_left", False))
        # causal: the rows the probes share (template and common words) are the same in both contexts
        shared = _common_prefix([int(t[0]) for t in probes[0][key][0]],
                                [int(t[0]) for t in probes[1][key][0]]) - drop
        if shared > start - drop:
            second = self._from_tokens(probes[1])[0]
            a, b = first[0, :shared].float(), second[0, :shared].float()
            self._causal = bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()) + 1e-8))

    @property
    def context_width(self) -> int:
        """Features per context row (768 on SD1, 2048 on SDXL, 4096 on Flux and SD3)."""
        self._runs()
        return self._width

    @property
    def pooled_width(self) -> int:
        """Features of the pooled vector (0 when the CLIP gives none): Flux 768, SD3 2048."""
        self._runs()
        return self._pooled_width

    @property
    def context_length(self) -> int:
        """Rows of the empty prompt's context (77 on SD, 256 on Flux, 154 on SD3): longer prompts are
        cut to it, except where every prompt's context has its own length (`context_varies`)."""
        return self._runs()[0]

    @property
    def context_varies(self) -> bool:
        """Whether every prompt's context has its own length (the LLM encoders: Qwen-Image, Z-Image,
        Lumina 2, Flux.2, HunyuanImage 2.1); a batch is then padded with zero rows (`pads_left`)."""
        self._runs()
        return self._varies

    @property
    def pads_left(self) -> bool:
        """Whether a batch of contexts of different lengths is padded before each prompt's rows (the side
        Flux.2's Mistral tokenizer pads, as Flux.2's model pads every context to 512 rows) rather than after."""
        self._runs()
        return self._pad_left

    def prompt_layout(self) -> tuple[str, int, int, int]:
        """(tokenizer key of the first run, index of the prompt's first own token in that run's tokens as
        the tokenizer gives them, the EOS id after them (-1: none), template tokens the encoder leaves
        out of the context): `_runs` for a caller that runs the encoder on token ids itself
        (`text_hooks.ComfyTextModel`: EMCID, the red team's soft prompts)."""
        key, start, eos = self._runs()[1][0]
        return key, start, eos, self._drop

    def token_segments(self, prompt: str) -> list[tuple[int, list[int], int, int, bool | None]]:
        """The context's token runs for `prompt`: [(first context row, ids, first position of the prompt's
        own tokens, EOS id, causal)] (`editing.uce.closed_form.token_segments`). ids[i] is context row
        first row + i (template tokens the encoder leaves out of the context are left out here); EOS id
        -1: no token follows the prompt's; causal: whether each row reads only the tokens before it
        (None where not read: contexts of one length keep the CLIP/T5 rule)."""
        tokens = self.clip.tokenize(prompt)
        runs = self._runs()[1]
        out, offset = [], 0
        for k, start, eos in runs:
            ids = [int(t[0]) for t in tokens[k][0]]
            if self._drop:  # one run: the dropped template prefix has no row
                ids, start = ids[self._drop:], start - self._drop
            out.append((offset, ids, start, eos, self._causal))
            offset += len(ids)
        return out

    def _batch(self, prompts: Sequence[str]):
        """([(context, pooled, extras)] of `prompts`, each its own encode; the rows of their batch)."""
        items = [self._encode_one(p) for p in prompts]
        if self._dict and (self._varies or any(e for _, _, e in items)):
            for p, (c, _, e) in zip(prompts, items):
                self._remember(p, c, e)
        return items, max((int(c.shape[1]) for c, _, _ in items), default=0)

    def _stack(self, items, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch of `items`' contexts, each padded to `rows`, and of their pooled vectors."""
        cond = torch.cat([_pad_rows(c, rows, self._pad_left) for c, _, _ in items])
        pools = [p for _, p, _ in items]
        pooled = torch.cat(pools) if all(p is not None for p in pools) else None
        if self.device is not None:
            cond = cond.to(self.device)
            pooled = pooled.to(self.device) if pooled is not None else None
        return cond, pooled

    def encode_with_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, T, d], pooled [B, p] or None). CLIP and T5 contexts all have one length and are
        stacked as they are. Contexts of their own lengths (`context_varies`) are padded with zero rows
        after each prompt's rows, or before them (`pads_left`), to the multiple of `_ROWS_MULTIPLE` (512)
        rows that holds the longest, so every prompt's rows are exactly its own encode and separately
        encoded batches still stack. ComfyUI's way, repeating each context to the least common multiple
        of the lengths (`comfy.conds.CONDCrossAttn.concat`), leaves only plain cross-attention
        unchanged; the models these encoders feed read their text as `CONDRegular` (joint attention,
        text positions), whose conditionings of different lengths ComfyUI never batches."""
        items, rows = self._batch(prompts)
        if self._varies:
            rows = -(-rows // _ROWS_MULTIPLE) * _ROWS_MULTIPLE
        return self._stack(items, rows)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_with_pooled(prompts)[0]

    def token_ids(self, prompt: str) -> list[int]:
        """The ids of the first encoder whose tokens make up the context (CLIP-L's on SD, T5's on Flux),
        from the first that has a context row."""
        tokens = self.clip.tokenize(prompt)
        return [int(t[0]) for t in tokens[self._runs()[1][0][0]][0]][self._drop:]

    def _batched_extras(self, items, rows: int) -> dict:
        """The prompts' extras as one batch of contexts of `rows` rows: tensors stacked (other
        dimensions that differ zero-padded at the end), other values kept when every prompt has the
        same, a key only some prompts have left out. Attention masks (ones for a prompt whose CLIP gave
        none) only where no context is padded: ComfyUI's DiTs take a text mask for a batch of one
        prompt (Lumina's refiner and HunyuanVideo's blocks fail on a [B, T] one), and
        ComfyUI's encoders pad nothing, so a padded batch goes without one (see `extras_for`)."""
        keys = list(dict.fromkeys(k for _, _, e in items for k in e))
        out = {}
        for key in keys:
            if key == "attention_mask":
                continue
            vals = [e.get(key) for _, _, e in items]
            if any(v is None for v in vals):
                log.warning("only some prompts of the batch have the CLIP output %r: left out for all", key)
            elif all(torch.is_tensor(v) for v in vals):
                out[key] = _cat_padded(vals)
            elif all(v is vals[0] or (not torch.is_tensor(v) and v == vals[0]) for v in vals):
                out[key] = vals[0]
        lengths = [int(c.shape[1]) for c, _, _ in items]
        if "attention_mask" in keys and all(n == rows for n in lengths):
            given = [e.get("attention_mask") for _, _, e in items]
            dtype = next(m.dtype for m in given if torch.is_tensor(m))
            out["attention_mask"] = torch.cat([m.reshape(1, -1).to(dtype) if torch.is_tensor(m)
                                               else torch.ones(1, n, dtype=dtype) for m, n in zip(given, lengths)])
        return out

    def conditioning(self, prompts: Sequence[str]):
        """ComfyUI's CONDITIONING of the prompts, as CLIPTextEncode makes it: the pooled output is
        always named, None where the CLIP gives none (Chroma's and Flux.2's models read the key), and
        everything else the CLIP returns (`encode_from_tokens(..., return_dict=True)`: attention masks,
        HiDream's `conditioning_llama3`, ...) batched across the prompts (`_batched_extras`)."""
        items, rows = self._batch(prompts)
        cond, pooled = self._stack(items, rows)
        return [[cond, {"pooled_output": pooled, **self._batched_extras(items, rows)}]]

    # ---- the extras of an encoded context, for the denoiser ----
    @staticmethod
    def _direction(width: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(width)
        v = torch.randn(width, generator=g, dtype=torch.float64)
        return (v / v.norm()).to(device=device, dtype=torch.float32)

    def _remember(self, prompt: str, cond: torch.Tensor, extras: dict) -> None:
        if prompt not in self._fps:
            with torch.no_grad():
                self._fps[prompt] = (cond[0].float() @ self._direction(cond.shape[-1], cond.device)).double().cpu()
            self._fp_groups = None
        self._keep_extras(prompt, extras)

    def _keep_extras(self, prompt: str, extras: dict) -> None:
        self._extras.pop(prompt, None)
        self._extras[prompt] = extras
        while len(self._extras) > _KEEP_EXTRAS:
            self._extras.pop(next(iter(self._extras)))

    def _match(self, fp: torch.Tensor) -> str | None:
        """The prompt whose context has fingerprint `fp` [T] (its rows, padded or not), or None."""
        if self._fp_groups is None:
            groups: dict[int, list[str]] = {}
            for p, f in self._fps.items():
                groups.setdefault(int(f.shape[0]), []).append(p)
            self._fp_groups = {n: (ps, torch.stack([self._fps[p] for p in ps])) for n, ps in groups.items()}
        rows = int(fp.shape[0])
        for n, (ps, table) in self._fp_groups.items():
            if n > rows:
                continue
            own, pad = (fp[rows - n:], fp[:rows - n]) if self._pad_left else (fp[:n], fp[n:])
            scale = float(own.abs().max()) + 1e-12
            if pad.numel() and float(pad.abs().max()) > 1e-6 * scale:
                continue
            err = (table - own).abs().amax(dim=1)
            best = int(err.argmin())
            if float(err[best]) <= 1e-4 * scale:
                return ps[best]
        return None

    def own_rows(self, context: torch.Tensor) -> list[int] | None:
        """Per row of a context batch [B, T, d]: how many rows that prompt's context has without the
        zero rows a batch of different lengths is padded with (after its rows, or before them where the
        tokenizer pads left); None where contexts do not vary in length (CLIP, T5: padding is part of
        every context there). An LLM's hidden state is never an exact zero row, so this holds for any
        batch, soft prompts' included. ComfyDenoiser runs a batch of mixed lengths per length from
        this, so no prompt is seen with padding its model never reads."""
        if context.ndim != 3 or not self.context_varies:
            return None
        with torch.no_grad():
            filled = (context.detach() != 0).any(dim=-1).cpu()  # [B, T]
        t = filled.shape[1]
        out = []
        for row in filled:
            idx = torch.nonzero(row).flatten()
            if idx.numel() == 0:
                out.append(t)
            elif self._pad_left:
                out.append(t - int(idx[0]))
            else:
                out.append(int(idx[-1]) + 1)
        return out

    def extras_for(self, context: torch.Tensor) -> dict:
        """`extra_conds` keywords for a context [B, T, d] made of contexts this ComfyText encoded, as
        `conditioning` gives them for the same prompts: what the CLIP returned besides the context
        (HiDream's Llama states, attention masks), batched, on the context's device, and, where every
        row of the batch is padded, `cross_attn`: the context without the padding all rows share, so
        that a batch of one prompt's context (or of contexts of one length) reaches the model exactly
        as that prompt's own encode; a batch of different lengths keeps zero rows after the shorter
        ones (before them on Flux.2, which pads so itself). ComfyDenoiser passes these to the model.
        Rows are recognised by their values (a fixed projection of every row), so copies, moves,
        slices and concatenations of encoded contexts are found; {} when some row is none of them (a
        soft prompt's) or nothing was kept (a CLIP with no extras and contexts of one length)."""
        if not self._fps or context.ndim != 3:
            return {}
        with torch.no_grad():
            fps = (context.detach().float() @ self._direction(context.shape[-1], context.device)).double().cpu()
        prompts = [self._match(f) for f in fps]
        if any(p is None for p in prompts):
            return {}
        items = []
        for p in prompts:
            extras = self._extras.get(p)
            if extras is None:  # kept no longer: encoded again
                extras = self._encode_one(p)[2]
                self._keep_extras(p, extras)
            items.append((torch.empty(1, int(self._fps[p].shape[0]), 0), None, extras))
        rows = max(int(c.shape[1]) for c, _, _ in items)
        out = {k: (v.to(context.device) if torch.is_tensor(v) else v)
               for k, v in self._batched_extras(items, rows).items()}
        if rows < context.shape[1]:
            out["cross_attn"] = context[:, context.shape[1] - rows:] if self._pad_left else context[:, :rows]
        return out


# ---- denoiser ------------------------------------------------------------------------------------
def _model_sampling(patcher):
    """The model sampling this MODEL samples with: an object patch (a ModelSamplingDiscrete node
    turning a finetune into v-prediction, say) takes precedence over the base model's own."""
    get = getattr(patcher, "get_model_object", None)
    if get is not None:
        return get("model_sampling")
    return getattr(patcher, "object_patches", {}).get("model_sampling", patcher.model.model_sampling)


def _noising(ms) -> str:
    """"ddpm" when the model noises as x_σ = x₀ + σ·ε (every EPS / V / EDM variant, the DDPM
    convention up to the scale 1/√ᾱ), "flow" when as x_σ = (1 − σ)·x₀ + σ·ε (rectified flow: SD3,
    Flux), else raise. Asked of ComfyUI's own `noise_scaling`, so it holds whatever the classes
    are called in a given ComfyUI version."""
    sigma = torch.tensor([0.3, 0.5]).view(2, 1)
    kind = None
    try:
        clean = ms.noise_scaling(sigma, torch.zeros(2, 1), torch.ones(2, 1))
        noisy = ms.noise_scaling(sigma, torch.ones(2, 1), torch.zeros(2, 1))
        if torch.allclose(clean, torch.ones(2, 1)) and torch.allclose(noisy, sigma):
            kind = "ddpm"
        elif torch.allclose(clean, 1 - sigma) and torch.allclose(noisy, sigma):
            kind = "flow"
    except Exception:  # a sampling without this interface is neither
        kind = None
    if kind is None or not hasattr(ms, "sigmas"):
        kinds = ", ".join(c.__name__ for c in type(ms).__mro__[1:] if c.__module__.startswith("comfy"))
        raise ConceptEditError(f"this model's prediction type ({kinds or type(ms).__name__}) is not supported by "
                               "the training methods and audits: they need an EPS, v-prediction or rectified-flow "
                               "model (SD1.x, SD2.x, SDXL, SD3, Flux and their finetunes)")
    return kind


# A flow model's σ = 1 is pure noise, which has no DDPM equivalent (ᾱ = 0); its last step is read at this σ.
_FLOW_SIGMA_MAX = 1.0 - 1e-3


def _flow_ddpm_sigma(sigma_flow: torch.Tensor) -> torch.Tensor:
    """The DDPM σ (x_t/√ᾱ = x₀ + σ·ε) of the same noise level as flow σ_f ((1 − σ_f)·x₀ + σ_f·ε):
    both are x₀ + (σ_f / (1 − σ_f))·ε up to scale."""
    s = sigma_flow.clamp(1e-6, _FLOW_SIGMA_MAX)
    return s / (1 - s)


def _is_inpaint(base) -> bool:
    # 2024-03 ComfyUI flags inpainting UNets with `inpaint_model`; current ComfyUI with `concat_keys`
    return bool(getattr(base, "inpaint_model", False)) or "masked_image" in tuple(getattr(base, "concat_keys", ()))


def _blank_inpaint_concat(x: torch.Tensor) -> torch.Tensor:
    """What ComfyUI feeds an inpainting UNet when it generates a whole picture (no mask, no image): a
    mask of ones and the latent of a blank picture (ComfyUI's `blank_inpaint_image_like` values)."""
    b, _, h, w = x.shape
    blank = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380], dtype=x.dtype, device=x.device).view(1, 4, 1, 1)
    return torch.cat([torch.ones(b, 1, h, w, dtype=x.dtype, device=x.device), blank.expand(b, 4, h, w)], 1)


class ComfyDenoiser:
    """`editing.hosts.Denoiser` and `Trainable` over a ComfyUI MODEL (+ the CLIP that encodes its prompts)."""

    def __init__(self, model, clip, *, sampler: str = "euler", scheduler: str = "normal",
                 latent_hw: int | tuple[int, int] | None = None, ctx: RunContext | None = None,
                 family: Family | None = None, base: Callable[[], Mapping[str, torch.Tensor]] | None = None,
                 cache_tag: Callable[[], str] | None = None):
        """`latent_hw`: the latent side, or (height, width), that this host generates at; None = the
        layout's native size (a layout no table names: SDXL's if it takes y, else SD1's). `family`,
        `base` (the unpatched weights) and `cache_tag` come from a `view.ModelView` when there is one,
        so that the model is read once per call; otherwise they are read from `model` when asked."""
        self.model = model
        self.text = clip if isinstance(clip, ComfyText) else ComfyText(clip)
        self.family = family or model_family(model)
        self._base, self._cache_tag = base, cache_tag
        self.sampler, self.scheduler = sampler, scheduler
        hw = latent_hw or self.family.native_latent
        self.latent_size = (int(hw[0]), int(hw[1])) if isinstance(hw, (tuple, list)) else (int(hw), int(hw))
        self.latent_hw = self.latent_size[0]
        self.ctx = ctx or RunContext()
        self._said_cfg1 = False  # the CFG-1 note of a guidance-distilled model is logged once per host

    @property
    def latent_dims(self) -> int:
        """Spatial dimensions of this model's latents: 2 (images), 3 for the video-shaped latents of
        Wan and Qwen-Image ([B, C, frames, H, W]; the pack draws one frame)."""
        return int(getattr(getattr(self.model.model, "latent_format", None), "latent_dimensions", 2))

    @property
    def latent_channels(self) -> int:
        """Channels of this model's latents, its latent format's (4 on SD1/SD2/SDXL, 16 on SD3 and
        Flux): what every picture the pack draws from noise (DDIM, red team, training) starts with."""
        return int(getattr(getattr(self.model.model, "latent_format", None), "latent_channels", 4))

    def base_weights(self) -> Mapping[str, torch.Tensor]:
        """ComfyUI key -> unpatched weight (`editing.hosts.base_weights`: what masks resolve against)."""
        return self._base() if self._base is not None else original_weights(self.model)

    @property
    def cache_tag(self) -> str:
        """Names this model in cached training latents (its fingerprint)."""
        return self._cache_tag() if self._cache_tag is not None else str(model_fingerprint(self.model))

    def modules(self) -> Mapping[str, torch.nn.Module]:
        import comfy.model_management as mm
        mm.load_models_gpu([self.model])
        return dict(self.model.model.diffusion_model.named_modules())

    @property
    def guidance_distilled(self) -> bool:
        """Whether the model is guidance-distilled (Flux-dev's guidance embedding): it samples at CFG 1
        (`editing.diffusion.sampling_cfg`) and its predictions take the embedding at `FLUX_GUIDANCE`."""
        return bool(getattr(getattr(self.model.model.diffusion_model, "params", None), "guidance_embed", False))

    def sample(self, prompts: Sequence[str], *, steps: int, cfg: float, seed: int, negative: str = "",
               on_step: Callable[[int], None] | None = None, latent: torch.Tensor | None = None,
               noise_per_prompt: bool = False) -> torch.Tensor:
        """Latents as ComfyUI's sampler returns them (the VAE's scale; `latent_in` gives the UNet's).
        `noise_per_prompt`: every prompt starts from the noise of a batch of one with `seed` (ComfyUI's
        own noise indices, all 0), instead of one draw over the whole batch. A guidance-distilled
        model samples at CFG 1 whatever `cfg` says (`sampling_cfg`), without its negative branch."""
        import comfy.sample
        if self.guidance_distilled and not self._said_cfg1:
            log.info("%s is guidance-distilled: the pack samples it at CFG 1 (its guidance embedding at %s)",
                     self.family.label, FLUX_GUIDANCE)
            self._said_cfg1 = True
        cfg = sampling_cfg(self, cfg)
        n = len(prompts)
        positive = self.text.conditioning(list(prompts))
        negative_c = self.text.conditioning([negative] * n)
        if latent is None:
            latent = torch.zeros(n, self.latent_channels, *self.latent_size)
        fix = getattr(comfy.sample, "fix_empty_latent_channels", None)  # video-shaped latents, as KSampler does
        latent = fix(self.model, latent) if fix is not None else latent
        noise = comfy.sample.prepare_noise(latent, seed, [0] * latent.shape[0] if noise_per_prompt else None)

        def callback(step, x0, x, total):
            self.ctx.check()
            if on_step is not None and step + 1 < steps:
                on_step(step + 1)

        if on_step is not None:
            on_step(0)
        # an inpainting UNet generates a whole picture as ComfyUI does it: everything masked for repaint
        mask = torch.ones(latent.shape[0], 1, *latent.shape[2:]) if _is_inpaint(self.model.model) else None
        out = comfy.sample.sample(self.model, noise, steps, cfg, self.sampler, self.scheduler, positive, negative_c,
                                  latent, denoise=1.0, noise_mask=mask, callback=callback, disable_pbar=True, seed=seed)
        return out

    def latent_in(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled latents (VAE scale) -> the UNet's scale, where x₀ of the training objectives lives."""
        return self.model.model.process_latent_in(x)

    # ---- training objectives ---------------------------------------------------------------
    def unet(self) -> torch.nn.Module:
        """The UNet that runs, with this MODEL's patches merged (loads it on the device)."""
        import comfy.model_management as mm
        mm.load_models_gpu([self.model])
        return self.model.model.diffusion_model

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..999 of the model's discrete schedule (σ² = (1 − ᾱ)/ᾱ). A flow model's
        schedule is its own σ_f at the same 1000 steps (its shift included), as the DDPM ᾱ of equal
        noise level (`_flow_ddpm_sigma`), so every objective written in ε sees the levels the model
        samples at."""
        ms = _model_sampling(self.model)
        s = ms.sigmas.float()
        if _noising(ms) == "flow":
            s = _flow_ddpm_sigma(s)
        return 1.0 / (1.0 + s ** 2)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-timestep weights turning an ε-MSE into the model's own training loss
        (`editing.diffusion.objective_weights`): 1/(1 − σ_f)² on a rectified-flow model, whose
        velocity error is the ε error divided by 1 − σ_f at the same x_σf; None (the ε-MSE) otherwise."""
        ms = _model_sampling(self.model)
        if _noising(ms) != "flow":
            return None
        s = ms.sigmas[t.reshape(-1).to(ms.sigmas.device).long()].float().clamp(1e-6, _FLOW_SIGMA_MAX)
        return (1.0 / (1.0 - s) ** 2).to(t.device)

    def adm(self, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """SDXL's vector conditioning for `pooled` (ComfyUI's own `encode_adm`: pooled ‖ size
        embeddings, at the latent size this host samples, no crop); None for models without one."""
        base = self.model.model
        if self.reads_pooled:  # Flux.1's vector_in, HiDream's p_embedder: the pooled vector itself
            if pooled is None:
                raise InvalidInputError(f"this {self.family.label} model needs the pooled text embedding: connect its "
                                        f"own CLIP ({clip_hint(self.family)}the checkpoint loader's CLIP output)")
            return pooled.reshape(batch if pooled.shape[0] == batch else pooled.shape[0], -1).expand(batch, -1)
        if not getattr(base, "adm_channels", 0):
            return None
        if pooled is None:
            raise InvalidInputError(f"this {self.family.label} model needs the pooled text embedding: encode the "
                                    "prompts with ComfyText.encode_with_pooled and pass its second output")
        h, w = (8 * n for n in self.latent_size)
        y = base.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                            target_height=h, device=pooled.device, seed=0)
        if y.shape[0] != batch:
            y = y.expand(batch, -1) if y.shape[0] == 1 else y
        return y

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The model's ε-prediction at DDPM-scaled x_t = √ᾱ x₀ + √(1−ᾱ) ε, integer timesteps t [B],
        text context [B, T, d] and, for SDXL-conditioned models, y = `adm(pooled, B)`; whatever the
        model predicts (ε, v, EDM), differentiable w.r.t. x, context, y and any hooked adapter.

        Every training objective, audit and presence score calls the model through here, and all of
        them are written in ε (ESD's guidance target, GA/RGD's truncation m, distillation, presence
        gains), so the output is converted to ε rather than the targets to the model's own type: one
        conversion in one place, and losses and scores mean the same on EPS and V models. The weights
        still train through the model's own output; for a v-model ε̂ − ε = √ᾱ·(v̂ − v), so the ε-MSE
        is the v-MSE weighted by ᾱ_t.

        The conversion is ComfyUI's own: `apply_model` takes x in its σ-space x_σ = x₀ + σε =
        x_t/√ᾱ (σ = `model_sampling.sigmas[t]`) and returns the denoised x₀ by the model's
        `calculate_denoised`, so ε = (x_σ − x₀)/σ for any prediction type it knows."""
        base = self.model.model
        if (getattr(base, "adm_channels", 0) or self.reads_pooled) and y is None:
            raise InvalidInputError(f"this {self.family.label} model needs its vector conditioning y: pass "
                                    "y = adm(pooled, batch) from the prompts' pooled text embedding")
        self.unet()  # loads this MODEL: its weight patches and object patches (model_sampling) in place
        ms = base.model_sampling
        kind = _noising(ms)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        sigma = ms.sigmas[t.to(ms.sigmas.device).long()].float().clone().to(x.device)
        if kind == "flow":
            # x_t/√ᾱ = x₀ + σ_d·ε is the flow model's x_σf up to the factor 1 − σ_f = 1/(1 + σ_d)
            sigma = sigma.clamp(1e-6, _FLOW_SIGMA_MAX)
            sd = _flow_ddpm_sigma(sigma).view(-1, *([1] * (x.ndim - 1)))
            sf = sigma.view_as(sd)
            x_in = x.float() * (1.0 + sd ** 2).sqrt() / (1.0 + sd)
            x0 = self._apply(base, x_in, sigma, context, y)
            return (x_in - (1 - sf) * x0.float()) / sf
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        x_sigma = x.float() * (1.0 + s ** 2).sqrt()
        x0 = self._apply(base, x_sigma, sigma, context, y)
        return (x_sigma - x0.float()) / s

    def _apply(self, base, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None):
        """`apply_model` on the batch; a batch whose prompts' contexts have different own lengths (LLM
        encoders, `ComfyText.own_rows`) runs once per length, each group on its rows without padding:
        ComfyUI samples every prompt at its own length, and these DiTs take no text mask for a padded
        batch, so zero rows would change what the model predicts. Differentiable throughout."""
        own = getattr(self.text, "own_rows", None)
        # one prompt needs no grouping (extras_for cuts its padding): no host read of the context
        rows = own(context) if own is not None and context.shape[0] > 1 else None
        if not rows or len(set(rows)) == 1:
            return base.apply_model(x, sigma, **self._conds(base, x, context, y))
        left = bool(getattr(self.text, "pads_left", False))
        parts, order = [], []
        for n in sorted(set(rows)):
            idx = [i for i, r in enumerate(rows) if r == n]
            sel = torch.tensor(idx, device=x.device)
            ctx = context[sel][:, context.shape[1] - n:] if left else context[sel][:, :n]
            xs, ys = x[sel], (y[sel] if y is not None else None)
            parts.append(base.apply_model(xs, sigma[sel.to(sigma.device)], **self._conds(base, xs, ctx, ys)))
            order += idx
        out = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out[inverse.to(out.device)]

    @property
    def reads_pooled(self) -> bool:
        """Whether the diffusion model reads the pooled text vector as it is (its y): a DiT whose
        adapter says so and which has the pooled projection (Flux.1's vector_in; Flux.2 and Chroma
        have none)."""
        adapter = self.family.adapter
        return bool(adapter is not None and adapter.pooled_y and self.family.projection_keys("pooled"))

    def _conds(self, base, x: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> dict:
        """What `apply_model` takes besides x and σ. SD-style UNets, Flux.1 and SD3: the context, y
        and (inpainting UNets, Flux-dev) the blank concat and the guidance, as always. Every other
        DiT: what ComfyUI's own `extra_conds` makes of the context and y for its sampler (Flux.2
        pads the text to 512 rows, Chroma takes a guidance of 0, Lumina the token count, ...), so
        the prediction is the one ComfyUI samples with. Every tensor stays differentiable."""
        if self.family.kind in ("unet", "sd3") or (self.family.kind == "flux" and self.family.variant == "flux1"):
            extra = {"c_concat": _blank_inpaint_concat(x)} if _is_inpaint(base) else {}
            if self.guidance_distilled:
                extra["guidance"] = torch.full((x.shape[0],), FLUX_GUIDANCE, device=x.device)
            return {"c_crossattn": context, "y": y, **extra}
        h, w = (8 * n for n in x.shape[-2:])
        # what the CLIP gave besides the context for these prompts (HiDream's Llama states, attention
        # masks), as CLIPTextEncode puts it in the conditioning: `ComfyText.extras_for`
        extras = getattr(self.text, "extras_for", None)
        extras = {"cross_attn": context, **(extras(context) if extras is not None else {})}
        conds = base.extra_conds(**extras, pooled_output=y, noise=x, device=x.device, width=w, height=h)
        return {k: c.process_cond(batch_size=x.shape[0], device=x.device).cond for k, c in conds.items()}

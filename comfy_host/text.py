"""`editing.hosts.Text` over a ComfyUI CLIP (`ComfyText`)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..editing.errors import ConceptEditError, InvalidInputError

log = logging.getLogger(__name__)


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
    """`editing.hosts.Text` over a ComfyUI CLIP.

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

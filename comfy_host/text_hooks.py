"""ComfyUI CLIP -> `editing.hosts.Text`: run the CLIP's text transformer(s) on token ids the
way ComfyUI builds the diffusion model's context, and expose their modules by name for hooks.

Path: CLIP → clip.cond_stage_model (SD1ClipModel / SD2ClipModel / SDXLClipModel / FluxClipModel /
SD3ClipModel / the T5-only and LLM classes) → .clip_l / .clip_h / .clip_g / .t5xxl / .umt5xxl /
.qwen25_7b / ... (SDClipModel) → .transformer: CLIP (comfy.clip_model.CLIPTextModel)
.text_model.encoder.layers[i].mlp.fc2; T5 (comfy.text_encoders.t5.T5)
.encoder.block[i].layer[1].DenseReluDense.wo; an LLM (comfy.text_encoders.llama)
.model.layers[i].mlp.down_proj.

Four text paths, as ComfyUI builds the model's inputs (`ComfyTextModel.path`):
- "sd": the CLIPs' states side by side on the features, the last CLIP's pooled output (SDXL: bigG's);
- "flux": T5's states alone, CLIP-L's pooled output (FluxClipModel);
- "sd3": CLIP-L ‖ CLIP-G on the features, zero-padded to 4096, then T5's states after them along
  the tokens; the pooled vector CLIP-L's ‖ CLIP-G's (SD3ClipModel, which also runs without T5);
- "single": one T5 or LLM encoder and no pooled vector: Chroma and PixArt (T5, each prompt its own
  length), AuraFlow (Pile-T5) and Wan (umT5, padded and masked), Qwen-Image and HunyuanImage 2.1
  (Qwen2.5-VL), Z-Image (Qwen3), Lumina 2 (Gemma 2), Flux.2 (Mistral 3, several layers stacked along
  the width). Where the prompt sits in the chat template, which template tokens the context leaves
  out and on which side a batch is padded are read off the CLIP by `text.ComfyText`; a batch runs
  right-padded with the padding masked, which leaves every prompt's own rows as its own encode (an
  LLM is causal; T5's attention skips masked keys), and `check` compares the result with ComfyUI's
  own encode before anything is computed.

Two ComfyUI details matter for gradients (EMCID stage 1):
- `CLIPLayer.forward` adds in place (``x += ...``) to a tensor its LayerNorm saved for backward;
  while grad is on we hand each LayerNorm a copy of its input (a pre-hook), so backward works.
- Weights loaded inside the executor's `torch.inference_mode()` are inference tensors and cannot
  be saved for backward; `editing.training.frozen_session` swaps them for plain copies for the
  duration (and does the same pre-norm copying for the UNet).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from ..editing.errors import ConceptEditError, InvalidInputError
from ..editing.hooks import norm_inputs_copied
from .text import ComfyText, _pad_rows, _ROWS_MULTIPLE

log = logging.getLogger(__name__)

_ENCODERS = ("clip_l", "clip_h", "clip_g")  # in the order ComfyUI concatenates them (SDXL: l ‖ g)
_T5 = "t5xxl"  # Flux's (and SD3's) T5, ComfyUI's own T5 class under an SDClipModel
# The prompt `ComfyTextModel.check` encodes both ways (its own path and ComfyUI's) before it is used.
_CHECK_PROMPT = "a photo of a cat"


def _kind(m) -> str | None:
    """"clip", "t5" or "llm" for an SDClipModel by its transformer's modules, None for anything else."""
    tr = getattr(m, "transformer", None)
    if tr is None:
        return None
    if hasattr(getattr(tr, "text_model", None), "encoder"):
        return "clip"
    if hasattr(tr, "shared") and hasattr(getattr(tr, "encoder", None), "block"):
        return "t5"
    layers = getattr(getattr(tr, "model", None), "layers", None)
    if layers is not None and len(layers) and hasattr(getattr(layers[0], "mlp", None), "down_proj"):
        return "llm"
    return None


def _text_path(csm, models: Mapping[str, torch.nn.Module]) -> str:
    # SD3's CLIP class always has the three attributes (None for an encoder it was built without)
    if hasattr(csm, "clip_g") and hasattr(csm, _T5) and hasattr(csm, "clip_l"):
        return "sd3"
    return "flux" if _T5 in models else "sd"


def _single_encoder(csm) -> tuple[str, str, torch.nn.Module, str] | None:
    """(encoder name, tokenizer key, its SDClipModel, "t5" or "llm") of a CLIP that reads the prompt
    through one T5 or LLM encoder, else None. ComfyUI's SD1ClipModel names that encoder (`clip`) and
    its tokens (`clip_name`); HunyuanImage 2.1's byT5 beside its Qwen2.5-VL reads only text in quotes,
    into an extra conditioning (`conditioning_byt5small`), and is not run here."""
    name, key = getattr(csm, "clip", None), getattr(csm, "clip_name", None)
    if not isinstance(name, str) or not isinstance(key, str):
        return None
    m = getattr(csm, name, None)
    kind = _kind(m)
    return (name, key, m, kind) if kind in ("t5", "llm") else None


_SUPPORTED = ("the CLIP encoders of SD1.x/SD2.x/SDXL with T5 on Flux.1 and SD3, a T5 alone (Chroma, PixArt, "
              "AuraFlow, Wan's umT5) or one LLM encoder (Qwen-Image, HunyuanImage 2.1, Z-Image, Lumina 2, Flux.2)")


def _sd_clip_models(clip, hint: str = "") -> dict[str, torch.nn.Module]:
    csm = clip.cond_stage_model
    out = {}
    for name in _ENCODERS:
        m = getattr(csm, name, None)
        if m is not None and _kind(m) == "clip":
            out[name] = m
    t5 = getattr(csm, _T5, None)
    if out and t5 is not None and hasattr(getattr(t5, "transformer", None), "shared"):
        out[_T5] = t5
    llms = [n for n, m in csm.named_children() if _kind(m) == "llm"]
    if out and llms:  # HiDream's QuadrupleCLIPLoader: CLIP-L, CLIP-G, T5 and Llama 3.1
        raise InvalidInputError(
            f"this CLIP ({type(csm).__name__}) reads the prompt with {', '.join(list(out) + llms)}: the model takes "
            f"the context from one and the hidden states of the LLM ({', '.join(llms)}) from another, so an edit or "
            "soft prompt in one of them leaves the concept in the others. EMCID and the red team's prompt attacks "
            "support " + _SUPPORTED + "; on HiDream use Unlearn Concept or ConceptPrune instead")
    if not out:
        raise InvalidInputError(f"this CLIP ({type(csm).__name__}) has no text encoder that EMCID and the red-team "
                                f"audit can run: they support {_SUPPORTED}. Connect the model's own CLIP "
                                f"({hint or 'SD3: CLIP-L and/or CLIP-G; Flux.1: DualCLIPLoader type flux; or '}"
                                "the checkpoint loader's CLIP output)")
    return out


class ComfyTextModel:
    """`editing.hosts.Text` over a ComfyUI CLIP (weights as patched on that CLIP).
    `hint`: the start of the advice on what to connect, for the refusal of a CLIP it cannot run
    (`editing.arch.clip_hint`: "Qwen-Image: qwen_2.5_vl_7b (CLIPLoader, type qwen_image), or ")."""

    def __init__(self, clip, device: torch.device | None = None, hint: str = ""):
        if clip is None:
            raise InvalidInputError("connect a CLIP")
        self.clip = clip
        csm = clip.cond_stage_model
        single = None if any(_kind(getattr(csm, n, None)) == "clip" for n in _ENCODERS) else _single_encoder(csm)
        self.layout: ComfyText | None = None
        if single is not None:
            name, self._key, m, kind = single
            self._models = {name: m}
            self.kinds = {name: kind}
            self.path = "single"
            # where the prompt's own tokens sit, what the context leaves out, the padding side: read off
            # the CLIP, as the closed form reads them
            self.layout = ComfyText(clip)
        else:
            self._models = _sd_clip_models(clip, hint)
            self.kinds = {e: "t5" if e == _T5 else "clip" for e in self._models}
            self.path = _text_path(csm, self._models)
        self.encoders = tuple(self._models)
        self._fit_length: dict[str, int] = {}
        self._said_cut = False
        self._modules: dict[str, dict[str, torch.nn.Module]] = {}
        self._out_device = device
        self.device = clip.patcher.load_device
        if single is not None:
            self.check(hint)

    def load(self) -> None:
        """Put the CLIP (with its patches) on its device, as `encode_from_tokens` does."""
        self.clip.load_model()

    def transformers(self) -> list[torch.nn.Module]:
        return [m.transformer for m in self._models.values()]

    def modules(self, encoder: str) -> Mapping[str, torch.nn.Module]:
        mods = self._modules.get(encoder)
        if mods is None:
            self.load()
            mods = self._modules[encoder] = dict(self._models[encoder].transformer.named_modules())
        return mods

    @property
    def flux(self) -> bool:
        """Flux's text path: the context is T5's alone, the pooled vector CLIP-L's."""
        return self.path == "flux"

    # ---- where the prompt sits ------------------------------------------------------------------
    def first_token(self, encoder: str) -> int:
        """Index of a prompt's first own token in `encoder`'s ids: after CLIP's BOS (1), T5's first (0), after
        the chat template's prefix on an LLM (Qwen-Image: its system prompt and "<|im_start|>user\\n")."""
        if self.path == "single":
            return self.layout.prompt_layout()[1]
        return 0 if self.kinds[encoder] == "t5" else 1

    def caption_rows(self, encoder: str, ids: torch.Tensor) -> torch.Tensor | None:
        """[B, L] True at the positions EMCID's C₀ averages over, where they are not CLIP's (BOS, the
        prompt, EOS: None): on an LLM every row of the template with the prompt (padding excluded). The
        template's rows are the same in every prompt and every later row reads them, as every CLIP row
        reads BOS, so they belong to what the edit must keep; the rows after the prompt
        (``<|im_end|>\\n<|im_start|>assistant\\n``) are rows the model reads."""
        if self.path != "single" or self.kinds[encoder] != "llm":
            return None
        return _attention_mask(self._models[encoder], ids).bool()

    def caption_tag(self, encoder: str) -> str:
        """What, besides the encoder's weights, decides its C₀ (part of the cache's name): on the single
        path the template around every caption (the empty prompt's tokens) and the rows read."""
        if self.path != "single":
            return ""
        return f"|{self.layout.prompt_layout()}|{self.token_rows([''])[0]}|{self.kinds[encoder]}"

    def read_layer(self, encoder: str) -> int | None:
        """The last layer of an LLM encoder whose output the diffusion model reads (an edit after it changes
        nothing): its hidden layer (Z-Image's and Lumina 2's penultimate, HunyuanImage's third from the
        end), the last of the layers Flux.2 stacks, the last layer where the output is read (Qwen-Image);
        after a CLIPSetLastLayer, its layer. None for CLIP and T5 encoders (every layer reaches the pooled
        output or the context)."""
        if self.kinds.get(encoder) != "llm":
            return None
        self._options()
        m = self._models[encoder]
        n = len(m.transformer.model.layers)
        if isinstance(m.layer, list):
            # item i of the list is the state going into layer i (i = n: the final output)
            read = min(max(int(i) for i in m.layer), n) - 1
        elif m.layer == "hidden" and m.layer_idx is not None:
            read = int(m.layer_idx) % n if int(m.layer_idx) < 0 else int(m.layer_idx)
        else:
            read = n - 1
        if read < 0:
            raise InvalidInputError(f"the {encoder} text encoder is read at its token embeddings ({m.layer}): no "
                                    "layer of it reaches the model, so there is nothing EMCID can edit")
        return read

    def emcid_refusal(self) -> str | None:
        """Why EMCID's closed form does not hold on this CLIP's encoder, or None. It writes each edited
        layer's change into the residual stream through the MLP's output projection, which holds where
        the block adds that output as it is; Gemma 2 (Lumina 2) normalises it first
        (`post_feedforward_layernorm`), so the stream moves by a normalised vector, not by the change,
        and prompts the edit should keep move with it."""
        for enc in self.encoders:
            if self.kinds[enc] != "llm":
                continue
            layers = self._models[enc].transformer.model.layers
            if len(layers) and getattr(layers[0], "post_feedforward_layernorm", None) is not None:
                return (f"its {enc} text encoder normalises each MLP's output before adding it to the residual "
                        "stream (post_feedforward_layernorm), so a closed-form change of its down_proj does not add "
                        "to that stream as EMCID's solve assumes")
        return None

    # ---- tokens ---------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], rewrite: Mapping[str, object] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Token ids per encoder and, per encoder, each prompt's number of real tokens (no BOS/EOS, no
        template). `rewrite`: encoder -> a function applied to each prompt before that encoder's own
        tokenizer reads it (the red team's placeholders differ per tokenizer)."""
        if self.path == "single":
            enc = self.encoders[0]
            fn = (rewrite or {}).get(enc) if rewrite else None
            return self.batch(self.token_rows([fn(p) if fn else p for p in prompts]))
        ids: dict[str, list[list[int]]] = {e: [] for e in self.encoders}
        n_real: dict[str, list[int]] = {e: [] for e in self.encoders}
        for p in prompts:
            if rewrite:
                toks = {e: getattr(self.clip.tokenizer, e).tokenize_with_weights(rewrite.get(e, lambda x: x)(p))
                        for e in self.encoders}
            else:
                whole = self.clip.tokenize(p)
                toks = {e: whole[e[len("clip_"):] if e.startswith("clip_") else e] for e in self.encoders}
            for e in self.encoders:
                chunk = toks[e][0]
                if any(not isinstance(t[0], int) for t in chunk):
                    raise InvalidInputError(f"{p!r} uses a textual-inversion embedding; EMCID edits words only")
                row = [int(t[0]) for t in chunk]
                ids[e].append(self._fit(e, _T5, row, p) if e == _T5 else row[:77])
                end = self._models[e].special_tokens.get("end")
                first = 0 if e == _T5 else 1  # CLIP rows start with BOS
                row = ids[e][-1]
                n_real[e].append(row.index(end, first) - first if end in row[first:] else len(row) - first)
        out = {e: torch.tensor(v, dtype=torch.long, device=self.device) for e, v in ids.items()}
        return out, {e: torch.tensor(v, dtype=torch.long) for e, v in n_real.items()}

    def token_rows(self, prompts: Sequence[str]) -> list[list[int]]:
        """The single encoder's token ids of each prompt as its tokenizer gives them (chat template
        included), a fixed-length T5 row cut to the empty prompt's length."""
        enc = self.encoders[0]
        rows = []
        for p in prompts:
            chunks = self.clip.tokenize(p)[self._key]
            if len(chunks) != 1 or any(not isinstance(t[0], int) for t in chunks[0]):
                raise InvalidInputError(f"{p[:60]!r} uses a textual-inversion embedding or is split into several "
                                        "chunks by this CLIP's tokenizer; EMCID and the red team take plain words")
            row = [int(t[0]) for t in chunks[0]]
            if not self.layout.context_varies:
                row = self._fit(enc, self._key, row, p)
                if self._trimmed:  # its padding is masked and zeroed: `_forward_single` puts it back
                    row = row[:int(_attention_mask(self._models[enc], torch.tensor([row])).sum())]
            rows.append(row)
        return rows

    @property
    def _trimmed(self) -> bool:
        """Whether rows of a fixed-length T5 run without their padding (Wan's 512, AuraFlow's 256 tokens):
        where ComfyUI masks the padding and zeroes its rows, no real row reads it, so the statistics
        need not run it; the context gets its zero rows back."""
        m = self._models[self.encoders[0]]
        return (self.path == "single" and not self.layout.context_varies and self.kinds[self.encoders[0]] == "t5"
                and bool(getattr(m, "enable_attention_masks", False)) and bool(getattr(m, "zero_out_masked", False)))

    def batch(self, rows: Sequence[Sequence[int]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(ids [B, L], own-token counts [B]) of the single encoder's rows, padded on the right with its
        pad id, which its attention mask leaves out (`forward`)."""
        enc = self.encoders[0]
        _, start, eos, _ = self.layout.prompt_layout()
        pad = int(self._models[enc].special_tokens.get("pad", 0))
        width = max(len(r) for r in rows)
        n_real = []
        for r in rows:
            r = list(r)
            end = r.index(eos, start) if eos >= 0 and eos in r[start:] else len(r)
            n_real.append(end - start)
        ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=self.device)
        return {enc: ids}, {enc: torch.tensor(n_real, dtype=torch.long)}

    def _fit(self, encoder: str, key: str, row: list[int], prompt: str) -> list[int]:
        """A T5 row at the length of the empty prompt's (Flux 256, SD3 77, Wan 512, AuraFlow 256):
        ComfyUI's T5 tokenizer grows a long prompt's row past it, so the rows of a batch would differ; a
        longer prompt is cut to that many tokens, its last one EOS (as every context is cut to the empty
        prompt's length, `ComfyText.context_length`; the CLIP rows to their first 77)."""
        if encoder not in self._fit_length:
            self._fit_length[encoder] = len(self.clip.tokenize("")[key][0])
        n = self._fit_length[encoder]
        if len(row) <= n:
            return row
        if not self._said_cut:
            log.warning("a prompt longer than T5's %d tokens is cut to them for this method: %r", n, prompt[:60])
            self._said_cut = True
        return row[:n - 1] + [int(self._models[encoder].special_tokens.get("end", 1))]

    # ---- running the encoders -------------------------------------------------------------------
    def _options(self) -> None:
        """The CLIP's layer options as `encode_from_tokens` sets them (CLIPSetLastLayer's included)."""
        csm = self.clip.cond_stage_model
        csm.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:  # CLIPSetLastLayer
            csm.set_clip_options({"layer": self.clip.layer_idx})

    def forward(self, encoder: str, ids: torch.Tensor, masked: bool | None = None,
                projected: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder as `SDClipModel.forward` runs it (layer choice, CLIP skip, projected pooled); on the
        single path its part is the model's whole context (`_context_rows`). `masked` / `projected`
        (None: as ComfyUI runs this encoder): the tokens after EOS masked as keys, the pooled output
        projected or not (EMCID's official stage 1 runs the CLIP as HF's CLIPTextModel does)."""
        self.load()
        self._options()
        if self.path == "single":
            return self._forward_single(encoder, ids), None
        m = self._models[encoder]
        ids = ids.to(self.device)
        # a T5 loaded with its attention mask on (SD3's t5_attention_mask, some Flux loaders) attends
        # only up to EOS, and ComfyUI may zero the masked rows: both as `SDClipModel.forward` does
        masked = getattr(m, "enable_attention_masks", False) if masked is None else masked
        zero = getattr(m, "zero_out_masked", False)
        mask = _attention_mask(m, ids) if masked or zero else None
        with _ln_input_copies(m.transformer) if torch.is_grad_enabled() else _nothing():
            out = m.transformer(ids, mask if masked else None, intermediate_output=m.layer_idx,
                                final_layer_norm_intermediate=m.layer_norm_hidden_state)
        z = out[0] if m.layer == "last" else out[1]
        if zero:
            z = z * mask.unsqueeze(-1).to(z.dtype)
        pooled = None
        projected = m.return_projected_pooled if projected is None else projected
        if len(out) >= 4 and not projected and out[3] is not None:
            pooled = out[3].float()
        elif len(out) >= 3 and out[2] is not None:
            pooled = out[2].float()
        return z.float(), pooled

    def _forward_single(self, encoder: str, ids: torch.Tensor) -> torch.Tensor:
        m = self._models[encoder]
        ids = ids.to(self.device)
        own = _attention_mask(m, ids)  # 1 on each prompt's own tokens (an LLM's up to its padding, T5's up to EOS)
        varies = self.layout.context_varies
        # a padded batch always runs masked: masked keys leave every prompt's own rows as its own encode
        # (T5 attends both ways; ComfyUI runs Chroma's and PixArt's T5 unmasked on one prompt, unpadded)
        masked = bool(getattr(m, "enable_attention_masks", False)) or (varies and bool((own == 0).any()))
        layers = m.layer if isinstance(m.layer, list) or m.layer == "all" else m.layer_idx
        with _ln_input_copies(m.transformer) if torch.is_grad_enabled() else _nothing():
            out = m.transformer(ids, own if masked else None, intermediate_output=layers,
                                final_layer_norm_intermediate=m.layer_norm_hidden_state, dtype=torch.float32)
        z = (out[0] if m.layer == "last" else out[1]).float()
        if getattr(m, "zero_out_masked", False):
            keep = own.to(z.dtype)
            z = z * (keep[:, None, :, None] if z.ndim == 4 else keep[..., None])
        if z.ndim == 4:  # Flux.2: the read layers [B, layers, T, d] side by side on the width (Flux2TEModel)
            z = z.movedim(1, 2).reshape(z.shape[0], z.shape[2], -1)
        if varies:
            return self._context_rows(z, own)
        return _pad_rows(z, self.layout.context_length, False) if self._trimmed else z

    def _context_rows(self, z: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Each prompt's context rows (its own tokens, less the template tokens the encoder leaves out)
        as `ComfyText.encode` lays out a batch: zero rows after them (before them where the tokenizer
        pads left, Flux.2), to the multiple of 512 rows that holds the longest."""
        drop = self.layout.prompt_layout()[3]
        lengths = [int(n) for n in own.sum(1)]
        rows = max(n - drop for n in lengths)
        rows = -(-rows // _ROWS_MULTIPLE) * _ROWS_MULTIPLE
        left = self.layout.pads_left
        return torch.cat([_pad_rows(z[b:b + 1, drop:n], rows, left) for b, n in enumerate(lengths)])

    def context(self, ids: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        used = (_T5, "clip_l") if self.flux else self.encoders
        return self.combine({e: self.forward(e, ids[e]) for e in used})

    def combine(self, outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's context and pooled vector from the encoders' outputs, as ComfyUI builds them
        (see the module's docstring for the four paths)."""
        if self.path == "single":
            cond, pooled = outputs[self.encoders[0]][0], None
        elif self.flux:
            cond, pooled = outputs[_T5][0], outputs["clip_l"][1]
        elif self.path == "sd3":
            cond, pooled = _sd3_combine(outputs)
        else:
            clips = [e for e in self.encoders if e != _T5]
            cond = torch.cat([outputs[e][0] for e in clips], dim=-1)
            pooled = outputs[clips[-1]][1]
        if self._out_device is not None:
            cond = cond.to(self._out_device)
            pooled = pooled.to(self._out_device) if pooled is not None else None
        return cond, pooled

    def check(self, hint: str = "") -> None:
        """Refuse a single-encoder CLIP whose context this path does not reproduce: one prompt encoded
        here and by ComfyUI's own `encode_from_tokens` (through `ComfyText`) must agree. Guards every
        detail the path reads rather than knows (the template, the rows left out, the layers stacked)."""
        with torch.no_grad():
            mine = self.context(self.tokenize([_CHECK_PROMPT])[0])[0].float().cpu()
            want = self.layout.encode([_CHECK_PROMPT]).float().cpu()
        scale = float(want.abs().max()) + 1e-12
        if mine.shape != want.shape or float((mine - want).abs().max()) > 1e-3 * scale:
            got = f"{tuple(mine.shape)} vs {tuple(want.shape)}" if mine.shape != want.shape else \
                f"a difference of {float((mine - want).abs().max()) / scale:.2g} of its scale"
            raise ConceptEditError(
                f"this CLIP ({type(self.clip.cond_stage_model).__name__}) builds the model's text in a way EMCID and "
                f"the red team's prompt attacks do not reproduce ({got} for {_CHECK_PROMPT!r}), so their edits "
                f"would not be the ones the model reads. They support {_SUPPORTED}; connect the model's own CLIP "
                f"({hint}the checkpoint loader's CLIP output)")


def _attention_mask(m, ids: torch.Tensor) -> torch.Tensor:
    """ComfyUI's text attention mask [B, L]: 1 up to and including the first end token, 0 after it
    (an encoder without an end token: 0 from its first pad token on)."""
    end = m.special_tokens.get("end")
    hit = ids == (end if end is not None else m.special_tokens.get("pad", -1))
    before = (hit.long().cumsum(1) - hit.long()) > 0  # such a token sits strictly before
    mask = ~before if end is not None else ~(before | hit)
    return mask.long()


# SD3's joint context width (T5-XXL's) and the pooled widths it assumes for a missing CLIP
_SD3_CONTEXT, _SD3_POOLED = 4096, {"clip_l": 768, "clip_g": 1280}


def _sd3_combine(outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`SD3ClipModel.encode_token_weights` on per-encoder outputs: CLIP-L ‖ CLIP-G on the features
    (cut to the shorter), a missing CLIP-L as zeros in front of G, zero-padded to 4096, T5's states
    after them along the tokens; pooled = CLIP-L's ‖ CLIP-G's (zeros for a missing one)."""
    l, g, t5 = outputs.get("clip_l"), outputs.get("clip_g"), outputs.get(_T5)
    any_out = next(o[0] for o in (l, g, t5) if o is not None)
    batch, dev = any_out.shape[0], any_out.device
    cond = None
    if l is not None or g is not None:
        if l is not None and g is not None:
            cut = min(l[0].shape[1], g[0].shape[1])
            cond = torch.cat([l[0][:, :cut], g[0][:, :cut]], dim=-1)
        elif l is not None:
            cond = l[0]
        else:
            cond = torch.nn.functional.pad(g[0], (_SD3_POOLED["clip_l"], 0))
        cond = torch.nn.functional.pad(cond, (0, _SD3_CONTEXT - cond.shape[-1]))
    if t5 is not None:
        cond = t5[0] if cond is None else torch.cat([cond, t5[0].to(cond.dtype)], dim=-2)
    pooled = torch.cat([o[1] if o is not None and o[1] is not None
                        else torch.zeros(batch, _SD3_POOLED[name], device=dev)
                        for name, o in (("clip_l", l), ("clip_g", g))], dim=-1)
    return cond, pooled


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _ln_input_copies(transformer: torch.nn.Module):
    # CLIP layers' pre-norms, and T5's (each sub-layer's `layer_norm`; it adds in place as CLIP does)
    return norm_inputs_copied(transformer, ("layer_norm1", "layer_norm2", "layer_norm"))


# ---- the red team's soft tokens ----------------------------------------------------------------------
# Strings tried, in order, as the one position a soft token takes in a single-encoder CLIP's tokens:
# tokens no caption holds and each tokenizer reads as one (T5's first sentinel, a Qwen special token,
# a Mistral control token, Gemma's unused token), then plain words whose tokens are merged back into
# one position (`_Marker.splice`): a SentencePiece vocabulary may have no such token.
_MARKERS = ("<extra_id_0>", "<|fim_pad|>", "[PREFIX]", "<unused0>", "sks", "zqxj")


class _Marker:
    """A marker string and the token runs it becomes in a tokenizer's prompt: at the prompt's start and
    after a space (byte-level BPE reads " sks" and "sks" apart). `splice` turns each run in a row of
    ids into one position, the soft token's."""

    def __init__(self, text: str, first: list[int], inner: list[int]):
        self.text, self.runs = text, sorted({tuple(first), tuple(inner)}, key=len, reverse=True)

    @property
    def length(self) -> int:
        """Tokens of its longest run."""
        return len(self.runs[0])

    def splice(self, row: Sequence[int], start: int, end: int) -> tuple[list[int], list[int]]:
        """(the row with each run between `start` and `end` as one token, the positions of those tokens)."""
        out, where, i = list(row[:start]), [], start
        while i < end:
            run = next((r for r in self.runs if tuple(row[i:i + len(r)]) == r), None)
            if run is None:
                out.append(int(row[i]))
                i += 1
                continue
            where.append(len(out))
            out.append(int(run[0]))
            i += len(run)
        return out + [int(t) for t in row[end:]], where


class SoftComfyText:
    """`editing.hosts.Text` over a ComfyUI CLIP: the prompt's placeholder tokens get soft
    embeddings by a forward hook on each encoder's token embedding (differentiable in them), the rest
    runs as `ComfyTextModel` runs it. Also a `Text` (encode / encode_with_pooled / token_ids),
    through the same path, so every prompt of an attack is encoded one way."""

    placeholder = "sks"  # one token in CLIP's vocabulary, rare in prompts
    t5_placeholder = "<extra_id_0>"  # T5's first sentinel: one token, never in a caption

    def __init__(self, clip, device: torch.device | None = None, hint: str = ""):
        self.clip = clip
        self.model = ComfyTextModel(clip, device=device, hint=hint)
        self._tokens: dict[tuple[str, ...], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        path = self.model.path
        self._marker: _Marker | None = None
        if path == "single":
            # the soft tokens go where the prompt's placeholders are, in the one encoder's token embeddings
            # (each in the place of a marker's tokens, `_single_ids`)
            self.soft_encoders = [self.model.encoders[0]]
            self._rewrite = None
            self._marker = self._choose_marker()
            self._ph: dict[str, int] = {}
            return
        # Flux: the soft tokens go into T5, whose context is what the model reads; its CLIP-L (the
        # pooled vector only) reads the prompt with the placeholders left out. SD3: into CLIP-L and
        # CLIP-G (one vocabulary, so a soft prompt projects to words; they give the pooled vector
        # and the first 77 context rows), T5 reading the prompt without them, as CLIP-L does on Flux.
        drop = lambda p: " ".join(p.replace(self.placeholder, " ").split())  # noqa: E731
        self._rewrite = ({_T5: lambda p: p.replace(self.placeholder, self.t5_placeholder), "clip_l": drop}
                         if path == "flux" else {_T5: drop} if path == "sd3" and _T5 in self.model.encoders
                         else None)
        self.soft_encoders = ([_T5] if path == "flux"
                              else [e for e in self.model.encoders if self.model.kinds[e] == "clip"])
        ids, _ = self.model.tokenize([self.placeholder], self._rewrite)
        self._ph = {}
        for e in self.soft_encoders:
            row = ids[e]
            start = 0 if e == _T5 else 1
            end = self.model._models[e].special_tokens.get("end")
            if int(row[0, start + 1]) != end:
                raise InvalidInputError(f"this CLIP's {e} tokenizer splits the red team's placeholder word "
                                        f"{self.placeholder!r} into several tokens, so soft prompts cannot go in "
                                        "its place: the red-team audit supports CLIP tokenizers (SD1.x, SD2.x, SDXL, "
                                        "SD3) and Flux's T5")
            self._ph[e] = int(row[0, start])

    # ---- the single encoder's placeholders ----
    def _own_span(self, row: Sequence[int]) -> tuple[int, int]:
        """(first, end) of the prompt's own tokens in a row of the single encoder's tokens."""
        _, start, eos, _ = self.model.layout.prompt_layout()
        end = list(row).index(eos, start) if eos >= 0 and eos in list(row)[start:] else len(row)
        return start, end

    def _own(self, text: str) -> list[int]:
        row = self.model.token_rows([text])[0]
        a, b = self._own_span(row)
        return row[a:b]

    def _choose_marker(self) -> _Marker:
        """Of `_MARKERS`, the one whose runs are shortest (the earliest of equals) among those that this
        tokenizer gives back as runs `splice` finds where the placeholders are (three in a probe) and
        nowhere in a plain prompt. A special token usually comes back with the space before it as a
        token of its own (Qwen " " then <|fim_pad|>): the run takes both, so each soft token stands for
        a word with its leading space, as the projected words are read."""
        enc = self.soft_encoders[0]
        special = {int(v) for v in self.model._models[enc].special_tokens.values()}
        clean = self.model.token_rows(["a red circle"])[0]
        best = None
        for text in _MARKERS:
            first = self._own(text)
            a, with_a = self._own("a"), self._own(f"a {text}")
            inner = with_a[len(a):] if with_a[:len(a)] == a else []
            if not first or not inner or special & (set(first) | set(inner)):
                continue
            marker = _Marker(text, first, inner)
            row = self.model.token_rows([f"{text} {text} a red circle {text}"])[0]
            _, where = marker.splice(row, *self._own_span(row))
            _, plain = marker.splice(clean, *self._own_span(clean))
            if len(where) == 3 and not plain and (best is None or marker.length < best.length):
                best = marker
        if best is None:
            raise InvalidInputError(f"this CLIP's {enc} tokenizer has no token the red team can put soft embeddings "
                                    f"in (tried {', '.join(_MARKERS)}): its prompt attacks cannot run on this text "
                                    "encoder")
        return best

    def _single_ids(self, prompts: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Ids of the prompts with each placeholder as one token (the marker's run merged) and the mask of
        those tokens, per encoder."""
        enc = self.soft_encoders[0]
        rows, masks = [], []
        for row in self.model.token_rows([p.replace(self.placeholder, self._marker.text) for p in prompts]):
            spliced, where = self._marker.splice(row, *self._own_span(row))
            rows.append(spliced)
            masks.append(where)
        ids, _ = self.model.batch(rows)
        mask = torch.zeros(ids[enc].shape, dtype=torch.bool)
        for b, where in enumerate(masks):
            mask[b, where] = True
        return ids, {enc: mask}

    def _embedding(self, encoder: str) -> torch.nn.Module:
        return self.model._models[encoder].transformer.get_input_embeddings()

    def vocabulary(self) -> list[torch.Tensor]:
        self.model.load()
        return [self._embedding(e).weight for e in self.soft_encoders]

    def _inner_tokenizer(self):
        """The Hugging Face or SentencePiece tokenizer under the single encoder's ComfyUI tokenizer."""
        tok = self.clip.tokenizer
        key = self.model._key
        for name in (key, f"clip_{key}", self.model.encoders[0]):
            inner = getattr(getattr(tok, name, None), "tokenizer", None)
            if inner is not None:
                return inner
        raise InvalidInputError(f"cannot reach this CLIP's {key} tokenizer ({type(tok).__name__})")

    @property
    def excluded_tokens(self) -> list[int]:
        """Tokens a projection never picks: BOS/EOS (CLIP's last two ids); T5's pad, EOS, unknown and
        its sentinels (ids from 32000); on a single encoder every special, control, unknown, unused or
        byte token of its tokenizer, the marker's tokens and the embedding rows past its vocabulary."""
        rows = int(self.vocabulary()[0].shape[0])
        if self.model.path == "single":
            return self._single_excluded(rows)
        if self.model.flux:
            return [0, 1, 2] + list(range(32000, rows))
        return [rows - 2, rows - 1]

    def _single_excluded(self, rows: int) -> list[int]:
        cached = getattr(self, "_excluded", None)
        if cached is not None:
            return cached
        enc = self.soft_encoders[0]
        out = {int(v) for v in self.model._models[enc].special_tokens.values()}
        out |= {int(t) for r in self._marker.runs for t in r}
        inner = self._inner_tokenizer()
        sp = getattr(inner, "tokenizer", None)
        if sp is not None and hasattr(sp, "get_piece_size"):  # ComfyUI's SPieceTokenizer
            size = int(sp.get_piece_size())
            out |= {i for i in range(size) if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i)}
        else:  # Hugging Face
            size = len(inner)
            out |= {int(i) for i in getattr(inner, "all_special_ids", [])}
            out |= {int(i) for i in (getattr(inner, "added_tokens_decoder", None) or {})}
        out |= set(range(min(size, rows), rows))
        self._excluded = sorted(i for i in out if 0 <= i < rows)
        return self._excluded

    def decode(self, token_ids: Sequence[int]) -> str:
        tok = self.clip.tokenizer
        if self.model.path == "single":
            inner = self._inner_tokenizer()
            sp = getattr(inner, "tokenizer", None)
            dec = sp.decode if sp is not None and hasattr(sp, "get_piece_size") else inner.decode
            return dec([int(i) for i in token_ids]).strip()
        if self.model.flux:
            return tok.t5xxl.tokenizer.decode(list(token_ids)).strip()
        for name in ("clip_l", "clip_h", "clip_g"):
            inner = getattr(getattr(tok, name, None), "tokenizer", None)
            if inner is not None:
                return inner.decode(list(token_ids)).strip()
        raise InvalidInputError(f"cannot decode tokens with this CLIP's tokenizer ({type(tok).__name__})")

    def _ids(self, prompts: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Token ids per encoder and the placeholders' mask per soft encoder, tokenized once per prompt
        set (an attack encodes the same few prompts at every optimisation step)."""
        key = tuple(prompts)
        got = self._tokens.get(key)
        if got is None:
            if len(self._tokens) > 256:
                self._tokens.clear()
            if self._marker is not None:
                got = self._single_ids(prompts)
            else:
                ids = self.model.tokenize(list(prompts), self._rewrite)[0]
                got = (ids, {e: (ids[e] == self._ph[e]).cpu() for e in self.soft_encoders})
            self._tokens[key] = got
        return got

    def encode_soft(self, prompts: Sequence[str], soft: Sequence[torch.Tensor] | None):
        ids, masks = self._ids(prompts)
        if soft is None:
            return self.model.context(ids)
        handles = []
        try:
            for e, vec in zip(self.soft_encoders, soft):
                mask = masks[e]
                counts = mask.sum(1)
                if not bool((counts == vec.shape[0]).all()):
                    raise InvalidInputError(f"every attacked prompt must hold {vec.shape[0]} placeholder tokens "
                                            f"({self.placeholder!r}); got {counts.tolist()}. If your concept prompts "
                                            f"contain the word {self.placeholder!r}, write it differently")

                def hook(mod, args, out, mask=mask, vec=vec):
                    rows = vec.to(device=out.device, dtype=out.dtype).repeat(out.shape[0], 1)
                    return out.masked_scatter(mask.to(out.device)[..., None], rows)
                handles.append(self._embedding(e).register_forward_hook(hook))
            return self.model.context(ids)
        finally:
            for h in handles:
                h.remove()

    def encode_with_pooled(self, prompts: Sequence[str]):
        return self.encode_soft(prompts, None)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_soft(prompts, None)[0]

    def transformers(self) -> list[torch.nn.Module]:
        return self.model.transformers()

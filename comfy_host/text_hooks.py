"""ComfyUI CLIP -> `editing.emcid.stage2.TextModel`: run the CLIP text transformer(s) on token ids the way
ComfyUI builds the UNet's context, and expose their modules by name for hooks.

Path: CLIP → clip.cond_stage_model (SD1ClipModel / SD2ClipModel / SDXLClipModel / FluxClipModel /
SD3ClipModel) → .clip_l / .clip_h / .clip_g (SDClipModel) → .transformer (comfy.clip_model.CLIPTextModel)
→ .text_model.encoder.layers[i].mlp.fc2; Flux's and SD3's .t5xxl → .transformer
(comfy.text_encoders.t5.T5) → .encoder.block[i].layer[1].DenseReluDense.wo.

Three text paths, as ComfyUI builds the model's inputs (`ComfyTextModel.path`):
- "sd": the CLIPs' states side by side on the features, the last CLIP's pooled output (SDXL: bigG's);
- "flux": T5's states alone, CLIP-L's pooled output (FluxClipModel);
- "sd3": CLIP-L ‖ CLIP-G on the features, zero-padded to 4096, then T5's states after them along
  the tokens; the pooled vector CLIP-L's ‖ CLIP-G's (SD3ClipModel, which also runs without T5).

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

from ..editing.errors import InvalidInputError
from ..editing.hooks import norm_inputs_copied

log = logging.getLogger(__name__)

_ENCODERS = ("clip_l", "clip_h", "clip_g")  # in the order ComfyUI concatenates them (SDXL: l ‖ g)
_T5 = "t5xxl"  # Flux's (and SD3's) T5, ComfyUI's own T5 class under an SDClipModel


def _text_path(csm, models: Mapping[str, torch.nn.Module]) -> str:
    # SD3's CLIP class always has the three attributes (None for an encoder it was built without)
    if hasattr(csm, "clip_g") and hasattr(csm, _T5) and hasattr(csm, "clip_l"):
        return "sd3"
    return "flux" if _T5 in models else "sd"


def _sd_clip_models(clip) -> dict[str, torch.nn.Module]:
    csm = clip.cond_stage_model
    out = {}
    for name in _ENCODERS:
        m = getattr(csm, name, None)
        if m is not None and hasattr(m, "transformer") and hasattr(getattr(m.transformer, "text_model", None), "encoder"):
            out[name] = m
    t5 = getattr(csm, _T5, None)
    if out and t5 is not None and hasattr(getattr(t5, "transformer", None), "shared"):
        out[_T5] = t5
    if not out:
        raise InvalidInputError(f"this CLIP ({type(csm).__name__}) has no CLIP text transformer (clip_l / clip_h / "
                                "clip_g), which EMCID and the red-team audit read (with T5 on Flux and SD3): connect "
                                "the model's own CLIP with its CLIP-L (SD3: CLIP-L and/or CLIP-G)")
    return out


class ComfyTextModel:
    """`editing.emcid.stage2.TextModel` over a ComfyUI CLIP (weights as patched on that CLIP)."""

    def __init__(self, clip, device: torch.device | None = None):
        if clip is None:
            raise InvalidInputError("connect a CLIP")
        self.clip = clip
        self._models = _sd_clip_models(clip)
        self.encoders = tuple(self._models)
        self.kinds = {e: "t5" if e == _T5 else "clip" for e in self.encoders}
        self.path = _text_path(clip.cond_stage_model, self._models)
        self._t5_length: int | None = None
        self._said_cut = False
        self._modules: dict[str, dict[str, torch.nn.Module]] = {}
        self._out_device = device
        self.device = clip.patcher.load_device

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

    def tokenize(self, prompts: Sequence[str], rewrite: Mapping[str, object] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Token ids per encoder and, per encoder, each prompt's number of real tokens (no BOS/EOS).
        `rewrite`: encoder -> a function applied to each prompt before that encoder's own tokenizer
        reads it (the red team's placeholders differ per tokenizer)."""
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
                ids[e].append(self._fit_t5(row, p) if e == _T5 else row[:77])
                end = self._models[e].special_tokens.get("end")
                first = 0 if e == _T5 else 1  # CLIP rows start with BOS
                row = ids[e][-1]
                n_real[e].append(row.index(end, first) - first if end in row[first:] else len(row) - first)
        out = {e: torch.tensor(v, dtype=torch.long, device=self.device) for e, v in ids.items()}
        return out, {e: torch.tensor(v, dtype=torch.long) for e, v in n_real.items()}

    def _fit_t5(self, row: list[int], prompt: str) -> list[int]:
        """A T5 row at the length of the empty prompt's (Flux 256, SD3 77): ComfyUI's T5 tokenizer
        grows a long prompt's row past it, so the rows of a batch would differ; a longer prompt is
        cut to that many tokens, its last one EOS (as every context is cut to the empty prompt's
        length, `ComfyText.context_length`; the CLIP rows to their first 77)."""
        if self._t5_length is None:
            self._t5_length = len(self.clip.tokenize("")[_T5][0])
        n = self._t5_length
        if len(row) <= n:
            return row
        if not self._said_cut:
            log.warning("a prompt longer than T5's %d tokens is cut to them for this method: %r", n, prompt[:60])
            self._said_cut = True
        return row[:n - 1] + [int(self._models[_T5].special_tokens.get("end", 1))]

    def forward(self, encoder: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder as `SDClipModel.forward` runs it (layer choice, CLIP skip, projected pooled)."""
        self.load()
        csm = self.clip.cond_stage_model
        csm.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:  # CLIPSetLastLayer
            csm.set_clip_options({"layer": self.clip.layer_idx})
        m = self._models[encoder]
        ids = ids.to(self.device)
        # a T5 loaded with its attention mask on (SD3's t5_attention_mask, some Flux loaders) attends
        # only up to EOS, and ComfyUI may zero the masked rows: both as `SDClipModel.forward` does
        masked, zero = getattr(m, "enable_attention_masks", False), getattr(m, "zero_out_masked", False)
        mask = _attention_mask(m, ids) if masked or zero else None
        with _ln_input_copies(m.transformer) if torch.is_grad_enabled() else _nothing():
            out = m.transformer(ids, mask if masked else None, intermediate_output=m.layer_idx,
                                final_layer_norm_intermediate=m.layer_norm_hidden_state)
        z = out[0] if m.layer == "last" else out[1]
        if zero:
            z = z * mask.unsqueeze(-1).to(z.dtype)
        pooled = None
        if len(out) >= 4 and not m.return_projected_pooled and out[3] is not None:
            pooled = out[3].float()
        elif len(out) >= 3 and out[2] is not None:
            pooled = out[2].float()
        return z.float(), pooled

    def context(self, ids: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        used = (_T5, "clip_l") if self.flux else self.encoders
        return self.combine({e: self.forward(e, ids[e]) for e in used})

    def combine(self, outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's context and pooled vector from the encoders' outputs, as ComfyUI builds them
        (see the module's docstring for the three paths)."""
        if self.flux:
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


class SoftComfyText:
    """`editing.redteam.soft.SoftText` over a ComfyUI CLIP: the prompt's placeholder tokens get soft
    embeddings by a forward hook on each encoder's token embedding (differentiable in them), the rest
    runs as `ComfyTextModel` runs it. Also a `TextEncoder` (encode / encode_with_pooled / token_ids),
    through the same path, so every prompt of an attack is encoded one way."""

    placeholder = "sks"  # one token in CLIP's vocabulary, rare in prompts
    t5_placeholder = "<extra_id_0>"  # T5's first sentinel: one token, never in a caption

    def __init__(self, clip, device: torch.device | None = None):
        self.clip = clip
        self.model = ComfyTextModel(clip, device=device)
        self._tokens: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        # Flux: the soft tokens go into T5, whose context is what the model reads; its CLIP-L (the
        # pooled vector only) reads the prompt with the placeholders left out. SD3: into CLIP-L and
        # CLIP-G (one vocabulary, so a soft prompt projects to words; they give the pooled vector
        # and the first 77 context rows), T5 reading the prompt without them, as CLIP-L does on Flux.
        drop = lambda p: " ".join(p.replace(self.placeholder, " ").split())  # noqa: E731
        path = self.model.path
        self._rewrite = ({_T5: lambda p: p.replace(self.placeholder, self.t5_placeholder), "clip_l": drop}
                         if path == "flux" else {_T5: drop} if path == "sd3" and _T5 in self.model.encoders
                         else None)
        self.soft_encoders = ([_T5] if path == "flux"
                              else [e for e in self.model.encoders if self.model.kinds[e] == "clip"])
        ids, _ = self.model.tokenize([self.placeholder], self._rewrite)
        self._ph: dict[str, int] = {}
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

    def _embedding(self, encoder: str) -> torch.nn.Module:
        return self.model._models[encoder].transformer.get_input_embeddings()

    def vocabulary(self) -> list[torch.Tensor]:
        self.model.load()
        return [self._embedding(e).weight for e in self.soft_encoders]

    @property
    def excluded_tokens(self) -> list[int]:
        """Tokens a projection never picks: BOS/EOS (CLIP's last two ids); T5's pad, EOS, unknown and
        its sentinels (ids from 32000)."""
        if self.model.flux:
            return [0, 1, 2] + list(range(32000, int(self.vocabulary()[0].shape[0])))
        return [int(self.vocabulary()[0].shape[0]) - 2, int(self.vocabulary()[0].shape[0]) - 1]

    def decode(self, token_ids: Sequence[int]) -> str:
        tok = self.clip.tokenizer
        if self.model.flux:
            return tok.t5xxl.tokenizer.decode(list(token_ids)).strip()
        for name in ("clip_l", "clip_h", "clip_g"):
            inner = getattr(getattr(tok, name, None), "tokenizer", None)
            if inner is not None:
                return inner.decode(list(token_ids)).strip()
        raise InvalidInputError(f"cannot decode tokens with this CLIP's tokenizer ({type(tok).__name__})")

    def _ids(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids per encoder, tokenized once per prompt set (an attack encodes the same few
        prompts at every optimisation step)."""
        key = tuple(prompts)
        ids = self._tokens.get(key)
        if ids is None:
            if len(self._tokens) > 256:
                self._tokens.clear()
            ids = self._tokens[key] = self.model.tokenize(list(prompts), self._rewrite)[0]
        return ids

    def encode_soft(self, prompts: Sequence[str], soft: Sequence[torch.Tensor] | None):
        ids = self._ids(prompts)
        if soft is None:
            return self.model.context(ids)
        handles = []
        try:
            for e, vec in zip(self.soft_encoders, soft):
                mask = ids[e] == self._ph[e]
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

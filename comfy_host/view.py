"""One view of a ComfyUI MODEL (and its CLIP) per node call: the layout read once, the unpatched
base weights read once (safely across clones and load states), the fingerprint, the text encoder,
the denoiser that predicts ε through ComfyUI's own model sampling, and the one way an edit goes
back onto a clone. Every method job builds one and hands its parts to the library."""
from __future__ import annotations

from functools import cached_property
from typing import Mapping

import torch

from ..editing.arch import Family, fingerprint
from ..editing.edit import Edit
from ..editing.errors import InvalidInputError
from ..editing.hosts import RunContext
from .adapters import ComfyDenoiser, ComfyText, add_edit_patches, clip_state, model_family, original_weights


_CLIP_HINTS = {"flux": "Flux: clip_l + t5xxl, DualCLIPLoader type flux, or ",
               "sd3": "SD3: clip_l + clip_g + t5xxl, TripleCLIPLoader, or "}


class ModelView:
    """`model` (and `clip`, needed by text-encoder methods and by everything that encodes prompts)
    as the methods see them. Nothing here writes to either: reads go through ComfyUI's state dict
    and its patch backups, results go onto clones (`apply`)."""

    def __init__(self, model, clip=None, *, ctx: RunContext | None = None,
                 latent: tuple[int, int] | None = None):
        if model is None:
            raise InvalidInputError("connect a MODEL")
        self.model, self.clip = model, clip
        self.ctx = ctx or RunContext()
        self.latent = latent

    @cached_property
    def family(self) -> Family:
        """The layout read from the model's keys and shapes (and the CLIP's encoders when connected)."""
        return model_family(self.model, self.clip)

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """ComfyUI key -> the unpatched UNet weight (a loaded clone's patched weights come from its backup;
        in low-VRAM mode the modules ComfyUI left unloaded were never patched in place)."""
        return original_weights(self.model)

    @cached_property
    def text_weights(self) -> dict[str, torch.Tensor]:
        if self.clip is None:
            raise InvalidInputError("this edit changes the text encoder: connect the CLIP too")
        return clip_state(self.clip)

    @cached_property
    def fingerprint(self) -> dict:
        return fingerprint(self.family, self.weights)

    @cached_property
    def text(self) -> ComfyText:
        """The CLIP as `editing.hosts.TextEncoder`, refused when its text is not as wide as the text
        this MODEL reads (a CLIP of another model would fail deep inside the first forward)."""
        if self.clip is None:
            raise InvalidInputError("connect the CLIP that came with this MODEL: it encodes the prompts")
        text = ComfyText(self.clip, device=self.ctx.device)
        # an MMDiT also reads the pooled vector itself (Flux vector_in 768, SD3 y_embedder 2048), which
        # tells apart the CLIPs of Flux and SD3 (both 4096 wide)
        pooled = next((p.cols for p in self.family.projections if p.source == "pooled"), 0)
        for what, need, got in (("text", self.family.context_dim, text.context_width),
                                ("a pooled vector", pooled, text.pooled_width)):
            if need and got != need:
                encoders = (", ".join(te.name for te in self.family.text_encoders)
                            or type(self.clip.cond_stage_model).__name__)
                raise InvalidInputError(
                    f"this CLIP ({encoders}) gives {what} {got} wide, but this {self.family.label} model reads "
                    f"{what} {need} wide: connect the CLIP of the model's own checkpoint "
                    f"({_CLIP_HINTS.get(self.family.kind, '')}the checkpoint loader's CLIP output)")
        return text

    def check_clip(self) -> None:
        """Refuse a CLIP whose text this MODEL cannot read (`text`), before a method starts that
        reaches the CLIP another way (EMCID's own text path, the debias loop's encode-once cache)."""
        _ = self.text

    @cached_property
    def denoiser(self) -> ComfyDenoiser:
        """The MODEL as `editing.hosts.Denoiser` + `Trainable`, at this view's latent size."""
        return ComfyDenoiser(self.model, self.text, ctx=self.ctx, latent_hw=self.latent, family=self.family,
                             base=lambda: self.weights, cache_tag=lambda: str(self.fingerprint))

    def stamp(self, edit: Edit) -> Edit:
        """Record this model's fingerprint on an edit made from it."""
        edit.fingerprint = self.fingerprint
        return edit

    def apply(self, edit: Edit, strength: float = 1.0, strict_weights: bool = False):
        """Clones of MODEL (and CLIP when the edit touches the text encoder) with `edit` as patches:
        (model', clip', warnings). Scope, family, layout and every key's shape are checked first;
        nothing is applied unless every key matched."""
        edit.check_finite()
        edit.check_scope()
        shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in self.weights.items()}
        te_w: Mapping[str, torch.Tensor] = {}
        if edit.text_encoder_keys():
            if self.clip is None:
                raise InvalidInputError(f"this {edit.method} edit changes the text encoder: connect the CLIP too")
            te_w = self.text_weights
            shapes.update({k: tuple(v.shape) for k, v in te_w.items()})
        warnings = edit.validate_for(self.family.name, shapes, self.fingerprint, strict_weights=strict_weights)
        out_model, out_clip = add_edit_patches(self.model, self.clip, edit, self.weights, te_w, strength)
        return out_model, out_clip, warnings

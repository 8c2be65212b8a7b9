"""Apply a ConceptEdit edit to a diffusers pipeline, reversibly.

    from conceptedit.editing.edit import Edit
    from conceptedit.editing.export.diffusers import apply_to_diffusers
    pipe = StableDiffusionPipeline.from_pretrained(...)          # or StableDiffusionXLPipeline
    handle = apply_to_diffusers(pipe, Edit.load("vangogh.safetensors"), strength=1.0)
    image = pipe("a starry night in the style of Van Gogh").images[0]
    handle.undo()                                                  # exactly the original weights again

Keys are mapped with the family tables (`editing.arch.Family.to_diffusers`): ComfyUI's
``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`` becomes the UNet's
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``, ``clip_l.transformer.*``
the ``text_encoder`` (SDXL: ``clip_g`` → ``text_encoder_2``), a DiT's keys the ``transformer``'s
names (``diffusion_model.txt_in.weight`` → ``transformer.context_embedder.weight`` on Chroma; its
adapter's table, `editing.arch.dit`). A Linear that diffusers splits (a fused ``qkv``) has no one
parameter there and is refused: load such an edit's LoRA export. Every key and shape is checked
before any weight is written; the handle keeps the original values of the changed weights only.
Pure torch: diffusers itself is never imported here (a pipeline is just an object with modules).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..arch import Family
from ..edit import Edit
from ..errors import FingerprintMismatchError, InvalidInputError

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def pipeline_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's components an edit can touch: a diffusers pipeline (attributes ``unet`` or
    ``transformer``, ``text_encoder``, ``text_encoder_2``) or a mapping with those names."""
    get = pipe.get if isinstance(pipe, Mapping) else (lambda name: getattr(pipe, name, None))
    mods = {name: get(name) for name in COMPONENTS}
    mods = {k: v for k, v in mods.items() if v is not None}
    if not {"unet", "transformer", "text_encoder"} & set(mods):
        raise InvalidInputError("this object has neither a 'unet', a 'transformer' nor a 'text_encoder'; pass a "
                                "diffusers pipeline (StableDiffusionPipeline, QwenImagePipeline, ...) or "
                                "{'unet': ..., 'text_encoder': ...}")
    return mods


def map_keys(edit: Edit, modules: Mapping[str, torch.nn.Module], family: Family | None = None
             ) -> dict[str, tuple[str, str, torch.nn.Parameter]]:
    """ComfyUI key -> (component, parameter name, the parameter), checked for existence and shape.
    Raises before anything is changed."""
    fam = family or edit.layout()
    params = {name: dict(mod.named_parameters()) for name, mod in modules.items()}
    out = {}
    for key, change in edit.changes.items():
        try:
            full = fam.to_diffusers(key)
        except KeyError as e:
            hint = (" (a layer diffusers splits has no one parameter to change: load the edit's LoRA export "
                    "with the pipeline's load_lora_weights instead)" if fam.is_mmdit else "")
            raise FingerprintMismatchError(f"{key} has no diffusers name in the {fam.label} table: "
                                           f"{e.args[0]}{hint}") from None
        component, name = full.split(".", 1)
        if component not in params:
            raise InvalidInputError(f"the edit changes the pipeline's {component} ({key}), which this pipeline does "
                                    f"not have; it has {sorted(params)}")
        p = params[component].get(name)
        if p is None and name.startswith("text_model."):
            # transformers 5 dropped the CLIPTextModel's ``text_model.`` level (4.x keeps it)
            name = name[len("text_model."):]
            p = params[component].get(name)
        if p is None:
            raise FingerprintMismatchError(
                f"the {fam.label} edit changes {component}.{name}, which this pipeline's {component} does not have: "
                f"is it a {fam.label} pipeline? (diffusers' SD2 text encoder also drops CLIP-H's last layer)")
        if tuple(p.shape) != tuple(change.shape):
            raise FingerprintMismatchError(f"{component}.{name}: the edit is for shape {tuple(change.shape)}, the "
                                           f"pipeline has {tuple(p.shape)}; the edit was made for another model")
        out[key] = (component, name, p)
    return out


@dataclass
class DiffusersEditHandle:
    """What `apply_to_diffusers` / `apply_to_parameters` changed; `undo()` writes the original values back (bit-exact)."""

    edit: Edit
    strength: float
    _saved: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=dict, repr=False)
    active: bool = True

    @property
    def keys(self) -> list[str]:
        return list(self._saved)

    @torch.no_grad()
    def undo(self) -> None:
        if not self.active:
            return
        for p, original in self._saved.values():
            p.data.copy_(original.to(device=p.device))
        self._saved.clear()
        self.active = False

    def __enter__(self) -> "DiffusersEditHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


@torch.no_grad()
def apply_to_diffusers(pipe: Any, edit: Edit, strength: float = 1.0, family: Family | None = None,
                       keep_originals_on: str | torch.device = "cpu") -> DiffusersEditHandle:
    """Add ``strength · ΔW`` to each weight the edit changes (masks: ΔW = −W ⊙ M), in place, in
    the weight's own dtype and device. Returns a handle whose ``undo()`` restores the originals,
    kept on ``keep_originals_on`` (cpu by default, so GPU memory grows by nothing)."""
    mapping = map_keys(edit, pipeline_modules(pipe), family)
    return apply_to_parameters(edit, {k: (f"{c}.{n}", p) for k, (c, n, p) in mapping.items()}, strength,
                               keep_originals_on)


@torch.no_grad()
def apply_to_parameters(edit: Edit, targets: Mapping[str, tuple[str, torch.nn.Parameter]], strength: float = 1.0,
                        keep_originals_on: str | torch.device = "cpu") -> DiffusersEditHandle:
    """The host-independent core (diffusers, Automatic1111): `targets` maps each key of the edit to
    (a name for messages, the live parameter). Every new value is computed and checked before any
    is written, so a failure leaves the model untouched."""
    if not torch.isfinite(torch.tensor(float(strength))):
        raise InvalidInputError(f"strength must be a finite number, got {strength}")
    edit.check_finite()
    missing = [k for k in edit.changes if k not in targets]
    if missing:
        raise FingerprintMismatchError(f"{len(missing)} weights of the edit have no place in this model (first: {missing[0]})")
    new_values = {}
    for key, (label, p) in targets.items():
        change = edit.changes[key]
        if tuple(p.shape) != tuple(change.shape):
            raise FingerprintMismatchError(f"{label}: the edit is for shape {tuple(change.shape)}, the model has "
                                           f"{tuple(p.shape)}; the edit was made for another model")
        delta = change.delta(p.data if change.kind == "mask" else None, dtype=torch.float32, device=p.device)
        w = (p.data.float() + strength * delta).to(p.dtype)
        if not bool(torch.isfinite(w).all()):
            raise InvalidInputError(f"{label} would become non-finite at strength {strength}; nothing changed")
        new_values[key] = w
    handle = DiffusersEditHandle(edit, strength)
    for key, w in new_values.items():
        p = targets[key][1]
        handle._saved[key] = (p, p.data.detach().to(keep_originals_on, copy=True))
        p.data.copy_(w)
    log.info("applied the %s edit to %d weights (strength %g)", edit.method, len(new_values), strength)
    return handle

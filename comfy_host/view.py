"""One view of a ComfyUI MODEL (and its CLIP) per node call, ComfyUI's `editing.hosts.Host`: the
layout read once, the unpatched base weights read once (safely across clones and load states), the
fingerprint, the text encoder, the denoiser that predicts ε through ComfyUI's own model sampling,
training under ComfyUI's executor, and the one way an edit goes back onto a clone. `jobs.run` builds
one and hands it to the method's `compute`."""
from __future__ import annotations

import logging
from contextlib import ExitStack
from functools import cached_property
from typing import Any, Callable, Mapping

import torch

from ..editing.arch import Family, clip_hint, fingerprint
from ..editing.arch.dit import text_encoders_read
from ..editing.edit import Change, Edit
from ..editing.errors import InvalidInputError
from ..editing.hosts import RunContext
from ..editing.training import frozen_session
from ..editing.uce.debias import similarity_judge
from .clip_judge import paired_text_embeddings
from .denoiser import ComfyDenoiser
from .patches import add_edit_patches, clip_state, model_family, original_weights, patched_weights
from .text import ComfyText
from .quantized import FloatWeights, rounding_per_layer, rounding_summary, weight_shapes

log = logging.getLogger(__name__)


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
        self.latent = latent  # the picture size in 8-pixel cells (`jobs.latent_size`), None = native

    @cached_property
    def family(self) -> Family:
        """The layout read from the model's keys and shapes (and the CLIP's encoders when connected)."""
        return model_family(self.model, self.clip)

    @cached_property
    def weights(self) -> FloatWeights:
        """ComfyUI key -> the unpatched UNet weight as a float tensor (a loaded clone's patched weights
        come from its backup; in low-VRAM mode the modules ComfyUI left unloaded were never patched in
        place). Weights stored quantized (float8, scaled fp8, QuantizedTensor, GGUF) read as their exact
        float32 values; `weights.stored` keeps them as ComfyUI holds them."""
        return original_weights(self.model)

    @cached_property
    def text_weights(self) -> FloatWeights:
        if self.clip is None:
            raise InvalidInputError("this edit changes the text encoder: connect the CLIP too")
        return clip_state(self.clip)

    @cached_property
    def text_norms(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Norm module name -> the model's own module as a function, for each norm a DiT applies in
        front of a text projection (Qwen-Image's `txt_norm`, Lumina's `cap_embedder.0`): the closed
        form solves on the rows that projection reads."""
        names = sorted({p.norm for p in self.family.projections if p.norm})
        root = self.model.model.diffusion_model
        return {n: _module_fn(root.get_submodule(n)) for n in names}

    @cached_property
    def fingerprint(self) -> dict:
        return fingerprint(self.family, self.weights)

    @cached_property
    def text(self) -> ComfyText:
        """The CLIP as `editing.hosts.Text`, refused when its text is not as wide as the text
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
                    f"({clip_hint(self.family)}the checkpoint loader's CLIP output)")
        return text

    def check_text_path(self, what: str) -> None:
        """Refuse, saying what to use instead, a method that runs the CLIP's own layers (EMCID, the red
        team's soft prompts) on a model whose text those hooks cannot reach exactly. They run CLIP and
        T5 (SD1.x/SD2.x/SDXL, Flux.1, SD3), a T5 alone (Chroma, PixArt, AuraFlow, Wan) and one LLM
        encoder (Qwen-Image, HunyuanImage 2.1, Z-Image, Lumina 2, Flux.2); `text_hooks.ComfyTextModel`
        then checks the CLIP itself against ComfyUI's own encode. HiDream reads four encoders, among
        them the Llama 3.1 states of every layer through each block's own projection: an edit or a soft
        prompt in one encoder leaves the concept in the others."""
        fam = self.family
        if fam.kind != "hidream":
            return
        instead = self.alternatives()
        raise InvalidInputError(f"{what} runs the text encoder's own layers; this {fam.label} reads "
                                f"{text_encoders_read(fam) or 'several text encoders'}, the context from T5 and "
                                "the hidden states of every Llama 3.1 layer in its blocks besides the pooled CLIP-L "
                                "and CLIP-G: an edit or soft prompt in one of them leaves the concept in the others. "
                                f"Use {instead} on this model instead.")

    def alternatives(self) -> str:
        """The methods that edit this model without running its text encoder, for a refusal's advice."""
        proj = next((p.module for p in self.family.projections if p.source == "tokens"), "")
        closed = bool(proj) and not (self.family.adapter is not None and self.family.adapter.closed_form_note)
        return (f"the Cross-Attention Edit (closed form on its text projection {proj}), " if closed else "") + \
            "Unlearn Concept or ConceptPrune"

    def check_clip(self) -> None:
        """Refuse a CLIP whose text this MODEL cannot read (`text`), before a method starts that
        reaches the CLIP another way (EMCID's own text path, the debias loop's encode-once cache)."""
        _ = self.text

    @property
    def downscale(self) -> int:
        """Pixels per latent cell of this model (8 on SD/Flux.1/SD3, 16 on Flux.2 and Wan 2.2 5B, 32 on
        HunyuanImage 2.1), from its latent format."""
        fmt = getattr(self.model.model, "latent_format", None)
        return int(getattr(fmt, "spacial_downscale_ratio", 8) or 8)

    def model_cells(self, cells8: tuple[int, int] | None) -> tuple[int, int] | None:
        """A picture size in 8-pixel cells (what the nodes' width/height give, `jobs.latent_size`) ->
        this model's latent cells; None stays None (the native size)."""
        if cells8 is None:
            return None
        r = self.downscale
        return max(1, int(cells8[0]) * 8 // r), max(1, int(cells8[1]) * 8 // r)

    def cells8(self) -> tuple[int, int]:
        """The picture size this view works at, in 8-pixel cells (its own `latent`, else the native size)."""
        if self.latent is not None:
            return int(self.latent[0]), int(self.latent[1])
        h, w = self.denoiser.latent_size
        return h * self.downscale // 8, w * self.downscale // 8

    @cached_property
    def denoiser(self) -> ComfyDenoiser:
        """The MODEL as `editing.hosts.Denoiser` + `Trainable`, at this view's latent size."""
        return ComfyDenoiser(self.model, self.text, ctx=self.ctx, latent_hw=self.model_cells(self.latent), family=self.family,
                             base=lambda: self.weights, cache_tag=lambda: str(self.fingerprint))

    def text_layers(self):
        """The CLIP's own layers on token ids (`text_hooks.ComfyTextModel`, on ComfyUI's compute device),
        refused where those hooks cannot reach the model's text exactly (`check_text_path`)."""
        if self.clip is None:
            raise InvalidInputError("connect the CLIP to edit")
        return self._text_layers

    @cached_property
    def _text_layers(self):
        import comfy.model_management as mm

        from .text_hooks import ComfyTextModel
        return ComfyTextModel(self.clip, device=mm.get_torch_device(), hint=clip_hint(self.family))

    def training(self, *, model: bool = False, text: bool = False, freeze: bool = True) -> ExitStack:
        """Gradients under ComfyUI's `torch.inference_mode()` executor: MODEL (`model`) and/or CLIP
        (`text`) loaded first, as ComfyUI loads them to sample (and patches them); then, with `freeze`,
        their modules' inference tensors swapped for plain frozen copies for the duration
        (`training.frozen_session`; methods that freeze what they train themselves pass False). Nothing
        of either is changed afterwards."""
        load = ([self.model] if model else []) + ([self.clip.patcher] if text and self.clip is not None else [])
        stack = training_mode(*load)
        if freeze:
            roots = (self.text_layers().transformers() if text else []) + \
                ([self.model.model.diffusion_model] if model else [])
            for root in roots:
                stack.enter_context(frozen_session(root))
        return stack

    @cached_property
    def _encoded_once(self) -> ComfyText:
        return _EncodedOnce(self.clip, device=self.ctx.device)

    def sampler(self, edit: Edit | None = None) -> ComfyDenoiser:
        """This MODEL (with `edit` applied to a clone) as a quiet `ComfyDenoiser` at this view's size,
        sharing one encode-once text: a loop that samples the same prompts round after round."""
        self.check_clip()
        quiet = RunContext(should_stop=self.ctx.should_stop, device=self.ctx.device)  # the loop reports rounds
        model = self.model if edit is None else self.apply(edit)[0]
        return ComfyDenoiser(model, self._encoded_once, ctx=quiet, latent_hw=self.model_cells(self.latent),
                             family=self.family, base=lambda: self.weights)

    def picture_judge(self, judge: Any, vae: Any, template: str) -> Callable:
        """A CLIP_VISION `judge` as ``judge(latents, options, concept) -> scores``: `vae` decodes the
        latents, the CLIP's text tower (which must pair with it) embeds each option as `template`."""
        if not hasattr(judge, "encode_image"):
            raise InvalidInputError(f"the debias judge must be a CLIP_VISION model, not {type(judge).__name__}")
        if vae is None:
            raise InvalidInputError("a CLIP vision judge looks at pictures: connect the checkpoint's VAE too")
        return similarity_judge(lambda latents: judge.encode_image(vae.decode(latents)).image_embeds,
                                paired_text_embeddings(self.clip), template)

    def other(self, model=None, *, latent: tuple[int, int] | None = None) -> "ModelView":
        """The view of `model` (None: this MODEL) with this CLIP and context, at `latent` (None: this
        view's size)."""
        return ModelView(self.model if model is None else model, self.clip, ctx=self.ctx,
                         latent=latent if latent is not None else self.latent)

    def difference(self, base: "ModelView") -> Edit | None:
        """This MODEL's weights minus `base`'s (`edit_between`) when both are clones of one network; None
        when this MODEL is a network of its own."""
        if self.model.model is not base.model.model:
            return None
        return edit_between(self.model, base.model, base)

    def stamp(self, edit: Edit) -> Edit:
        """Record this model's fingerprint on an edit made from it."""
        edit.fingerprint = self.fingerprint
        return edit

    def apply(self, edit: Edit, strength: float = 1.0, strict_weights: bool = False):
        """Clones of MODEL (and CLIP when the edit touches the text encoder) with `edit` as patches:
        (model', clip', warnings). Scope, family, layout and every key's shape are checked first;
        nothing is applied unless every key matched. Layers stored quantized add a warning with the
        rounding error their storage adds to the edit (`quantized.rounding_summary`)."""
        edit.check_finite()
        edit.check_scope()
        shapes: dict[str, tuple[int, ...]] = weight_shapes(self.weights)
        te_w: Mapping[str, torch.Tensor] = {}
        if edit.text_encoder_keys():
            if self.clip is None:
                raise InvalidInputError(f"this {edit.method} edit changes the text encoder: connect the CLIP too")
            te_w = self.text_weights
            shapes.update(weight_shapes(te_w))
        warnings = edit.validate_for(self.family.name, shapes, self.fingerprint, strict_weights=strict_weights)
        rounding = rounding_summary(rounding_per_layer(edit, strength, (self.weights, te_w)))
        out_model, out_clip = add_edit_patches(self.model, self.clip, edit, self.weights, te_w, strength)
        for line in rounding:
            log.warning("%s", line)
        return out_model, out_clip, warnings + rounding


def _module_fn(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as a function of rows on any device: run where its weights live, in their dtype (as the
    model runs it), the result back on the rows' device and dtype. No gradient: the rows are data."""
    def run(x: torch.Tensor) -> torch.Tensor:
        p = next((t for t in module.parameters() if t.is_floating_point()), None)
        dev, dt = (p.device, p.dtype) if p is not None else (x.device, x.dtype)
        if dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            dt = torch.float32  # a norm stored in float8 computes upcast, as ComfyUI's cast ops run it
        with torch.no_grad():
            return module(x.to(device=dev, dtype=dt)).to(device=x.device, dtype=x.dtype)
    return run


class _EncodedOnce(ComfyText):
    """ComfyText that encodes each distinct prompt once (its context, pooled vector and the CLIP's other
    outputs, `ComfyText._encode_one`): a loop generates the same prompts N times over with one text
    encoder."""

    def __init__(self, clip, device=None):
        super().__init__(clip, device=device)
        self._memo: dict[str, tuple] = {}

    def _encode_one(self, prompt: str):
        if prompt not in self._memo:
            self._memo[prompt] = super()._encode_one(prompt)
        return self._memo[prompt]


def training_mode(*load) -> ExitStack:
    """What training runs under inside ComfyUI's `torch.inference_mode()` executor. The MODELs (or
    patchers) in `load` are loaded first, still in inference mode as ComfyUI loads them: loaded
    outside it, ComfyUI's QuantizedTensor weights are swapped for non-inference ones, which its own
    state dict then fails to read under inference mode."""
    if load:
        import comfy.model_management as mm
        mm.load_models_gpu(list(load))
    stack = ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def edit_between(edited, original, view: ModelView | None = None) -> Edit:
    """The UNet weight change from `original` to `edited` (two ComfyUI MODELs, usually clones sharing
    one module): each one's unpatched weights plus its own patches, by ComfyUI's patch arithmetic
    (`patches.patched_weights`), so it does not matter what either has loaded, fully or in low-VRAM mode.
    `view`: the caller's view of `original`, whose layout and weights are then not read again."""
    keys = sorted(k for k in set(edited.patches) | set(original.patches) if k.startswith("diffusion_model."))
    if not keys:
        raise InvalidInputError("the edited MODEL carries no weight patches relative to the original; connect the EDIT "
                                "input instead (or the output of a ConceptEdit method node)")
    view = view or ModelView(original)
    we, wo = patched_weights(edited, keys), patched_weights(original, keys, base=view.weights)
    changes = {k: Change("delta", tuple(wo[k].shape), {"delta": we[k] - wo[k]}) for k in keys
               if not torch.equal(we[k], wo[k])}
    if not changes:
        raise InvalidInputError("the edited MODEL's weights equal the original's; nothing to audit")
    return Edit("model-difference", view.family.name, changes)


def apply_edit(model, clip, edit: Edit, strength: float = 1.0, strict_weights: bool = False):
    """Clone MODEL (and CLIP when the edit touches the text encoder) and add the edit as patches.

    Returns (model', clip', warnings). Checks the edit's scope (`editing.scope`), the family, layout
    and every key's shape before anything is applied; raises if any key fails to match (never a
    silent no-op). Patches are in the running ComfyUI's own form (`patches.edit_patches`)."""
    return ModelView(model, clip).apply(edit, strength, strict_weights=strict_weights)

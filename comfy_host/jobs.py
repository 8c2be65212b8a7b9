"""Running a method on ComfyUI's MODEL/CLIP, its result applied to a clone (the input is never
changed): the one entry the nodes, the command line and the benches share.

``run(method, model, clip, config, ctx=None) -> JobResult(model', clip', edit, warnings)``: `method`
names a row of `editing.methods.METHODS`, `config` is that method's job config (what to edit, the
method's own typed settings, and the strength and picture size every job takes), `ctx` the
progress/Cancel context (default: ComfyUI's progress bar and Cancel button). It builds one
`view.ModelView` of the input, the method's ``compute(view, config)`` reads what it needs from it,
and the view applies the edit.

Kept out of `nodes/` so that `cli/` and `bench/` do not import node classes, and out of `editing/`
because it speaks ComfyUI.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import ChainMap
from typing import Any, Mapping, NamedTuple

import torch

from ..editing.concept_prune.config import ConceptPruneJob
from ..editing.distill.config import DistillJob
from ..editing.edit import Edit
from ..editing.emcid.config import EmcidJob
from ..editing.export.lora import LoraExportConfig, save_lora
from ..editing.hosts import Job, PhaseRate, RunContext, latent_size, time_left_text
from ..editing.methods import METHODS, method
from ..editing.uce.config import UCEJob
from ..editing.unlearn.config import UnlearnJob
from .patches import clip_state, original_weights
from .progress import run_context
from .view import ModelView, edit_between

# the job configs by name, for the callers that build them
__all__ = ["run", "JobResult", "METHODS", "Job", "UCEJob", "ConceptPruneJob", "EmcidJob", "UnlearnJob", "DistillJob",
           "latent_size", "export_lora", "edit_between", "with_eta", "eta_text", "progress_text"]

log = logging.getLogger(__name__)


class JobResult(NamedTuple):
    model: Any       # the edited clone of MODEL (MODEL itself when the edit has no UNet key)
    clip: Any        # the edited clone of CLIP (CLIP itself when the edit has no text-encoder key)
    edit: Edit
    warnings: list


def progress_text(text: str) -> None:
    """`text` under the running node (ComfyUI's progress text), or the log outside a ComfyUI run."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        running = get_executing_context()
        server = PromptServer.instance
    except (ImportError, AttributeError):  # ComfyUI before progress texts, or headless
        running = server = None
    if running is None or server is None or not hasattr(server, "send_progress_text"):
        log.debug("%s", text)
        return
    server.send_progress_text(text, running.node_id)


def eta_text(what: str, done: int, total: int, seconds: float, start: int, concepts: Mapping | None = None) -> str:
    """'EMCID: 12/1000 concepts, about 3 min left': the work done and the time left at the rate since
    `start` (what was done before it, e.g. taken from the cache, does not count toward the rate)."""
    part = (f"{concepts['done']}/{concepts['total']} concepts" if concepts and concepts.get("total")
            else f"{100 * done // max(total, 1)} %")
    rate = (done - start) / seconds if seconds > 0 else 0.0
    if done >= total or rate <= 0:
        return f"{what}: {part}"
    return f"{what}: {part}, about {time_left_text((total - done) / rate)} left"


def with_eta(ctx: RunContext, what: str, every: float = 1.0) -> RunContext:
    """`ctx` whose progress also shows `eta_text` under the node (at most every `every` seconds), per
    phase (`PhaseRate`). A job that counts its own units (EMCID's concepts) reports them through the
    returned context's `items` before the progress they belong to; the text then names them."""
    inner, inner_items = ctx.progress, ctx.items
    phase = PhaseRate()
    shown = {"at": None, "total": None}
    units: dict = {}

    def items(done: int, total: int) -> None:
        if inner_items is not None:
            inner_items(done, total)
        units.update(done=done, total=total, fresh=True)

    def progress(done: int, total: int) -> None:
        if inner is not None:
            inner(done, total)
        elapsed = phase.update(done, total)
        now = phase.clock()
        if shown["total"] != total or shown["at"] is None or now - shown["at"] >= every or done >= total:
            shown.update(at=now, total=total)
            # a phase that counts units names them before each report (`fresh`); the others show a share
            named = dict(units) if units.pop("fresh", False) else None
            progress_text(eta_text(what, done, total, elapsed, phase.start, named))

    return dataclasses.replace(ctx, progress=progress, items=items)


def run(name: str, model, clip, config: Job, ctx: RunContext | None = None) -> JobResult:
    """Run the method `name` (a key of `editing.methods.METHODS`) with its job config on a view of MODEL
    (and CLIP), and apply the edit to clones at `config.strength`. Without `ctx`: ComfyUI's progress
    bar and Cancel, plus a time-left text under the node for the methods with long phases."""
    m = method(name, config)
    if ctx is None:
        ctx = run_context()
        if m.progress_text:
            ctx = with_eta(ctx, m.title)
    view = ModelView(model, clip, ctx=ctx, latent=config.latent())
    _ = view.family  # a layout the pack cannot read is refused before anything else is asked of the model
    edit = m.compute(view, config)
    view.stamp(edit)
    out_model, out_clip, warnings = view.apply(edit, config.strength)
    return JobResult(out_model, out_clip, edit, list(edit.metrics.get("warnings", ())) + list(warnings))


def export_lora(edit: Edit, path: str, config: LoraExportConfig, model=None, clip=None, ctx=None) -> dict:
    """Write `edit` as a LoRA file at `path` (masks need the MODEL/CLIP they were made for)."""
    config.validate()  # before any base weight is read
    weights: Mapping[str, torch.Tensor] = {}
    if any(c.kind == "mask" for c in edit.changes.values()):
        # chained, not merged: a quantized model's weights are dequantized only where a mask reads them
        weights = ChainMap(*[w for w in (clip_state(clip) if clip is not None else None,
                                         original_weights(model) if model is not None else None) if w is not None])
    return save_lora(edit, path, config, base=weights, ctx=ctx or run_context())

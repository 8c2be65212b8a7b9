"""Unlearning by fine-tuning (RGD / gradient ascent / ESD) and the resurgence audit, as nodes.

Training inside ComfyUI: the executor runs under ``torch.inference_mode()``; these nodes re-enable
gradients for the library call only. The library trains hooks on the model as it runs and never
writes its weights (see editing/training.py), so the input MODEL is unchanged also on Cancel.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..comfy_host.jobs import UnlearnJob, latent_size, run
from ..comfy_host.audits import audit_models
from ..editing.audit.resurgence import DEFAULT_BENIGN, AuditConfig
from ..editing.errors import InvalidInputError
from ..editing.report.plots import audit_plot, history_plot
from ..editing.training import PARAM_SETS
from ..editing.unlearn.trainer import PRESETS, preset_config
from ..editing.unlearn.config import METHODS, OFFICIAL, RETAIN_PAIRINGS
from .common import EDIT, audited_inputs, concept_prompts_input, node_schema, output, prompt_lines, size_inputs, verdict

log = logging.getLogger(__name__)


def _unlearn_config(method, params, steps, lr, rank, seed, alpha, truncation, eta, forget_objective, batch, n_prompts,
                    gen_steps, preset, retain_pairing, official):
    return preset_config(preset, method=method, param_set=params, steps=steps, lr=lr, rank=rank, seed=seed,
                         alpha=alpha, truncation=truncation, eta=eta, forget_objective=forget_objective, batch=batch,
                         n_prompts=n_prompts, gen_steps=gen_steps, retain_pairing=retain_pairing, official=official)


class TrainUnlearn(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditTrainUnlearn", "Unlearn Concept (RGD / ESD, train)",
            "Erase a concept by fine-tuning (RGD of Ko et al. 2024, their gradient-ascent baseline, or ESD "
            "negative guidance) on images the model generates itself. Trains a small LoRA by default, so the EDIT is a "
            "shareable file. The input MODEL is never changed; Cancel stops cleanly.",
            inputs=[
                io.Model.Input("model", tooltip="The model to unlearn from (cloned, never changed)."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.String.Input("concept", default="", tooltip="The concept word or phrase to erase, e.g. 'van gogh'."),
                io.String.Input("retain_prompts", multiline=True, default="",
                                tooltip="Extra prompts whose outputs must stay as they are (one per line); "
                                        "templated prompts without the concept are always used."),
                io.Combo.Input("method", options=list(METHODS), default="rgd",
                               tooltip="rgd: ascent on the concept + descent on retain, "
                                       "each gradient projected off the other when they conflict; ga: gradient ascent "
                                       "baseline, −L_forget + 0.1·L_retain; esd: negative guidance from the frozen "
                                       "model, on its own partial samples of the bare concept (Gandikota et al.)."),
                io.Combo.Input("params", options=list(PARAM_SETS), default="lora",
                               tooltip="What trains: lora (every transformer Linear, "
                                       "small file), lora-xattn, xattn (ESD-x, dense cross-attention), noxattn "
                                       "(ESD-u, dense everything else)."),
                io.Int.Input("steps", default=100, min=1, max=100000, tooltip="Optimiser steps."),
                io.Float.Input("lr", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="Adam learning rate (the paper: 1e-5 for full fine-tuning of SD; LoRA wants "
                                       "more; on the tiny Flux RGD erased at 1e-3–2e-3 on lora-xattn, ESD-x at 3e-3)."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (lora sets only)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of prompts, images and noise."),
                io.Float.Input("alpha", default=1.6, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="RGD: weight α of the retain gradient."),
                io.Float.Input("truncation", default=1.1, min=0.01, max=100.0, step=0.05, optional=True,
                               tooltip="RGD: a forget loss above m is set to the constant 1, so that batch adds no "
                                       "ascent (stops ascent running away)."),
                io.Float.Input("eta", default=1.0, min=0.0, max=20.0, step=0.1, optional=True,
                               tooltip="ESD: negative-guidance strength η."),
                io.Combo.Input("forget_objective", options=["ascent", "esd"], default="ascent", optional=True,
                               tooltip="RGD's forget gradient: ascent (the paper) or the ESD target."),
                io.Int.Input("batch", default=4, min=1, max=64, optional=True, tooltip="Images per forget/retain batch."),
                io.Int.Input("n_prompts", default=16, min=1, max=512, optional=True,
                             tooltip="Templated forget/retain prompt pairs (images generated once per run)."),
                io.Int.Input("gen_steps", default=20, min=1, max=200, optional=True,
                             tooltip="Sampling steps used to generate the training images."),
                io.Combo.Input("preset", options=["custom", *PRESETS], default="custom", optional=True, tooltip=(
                    "custom: method, params, steps and lr as set above. esd-x: Gandikota et al.'s ESD-x, ESD on the "
                    "cross-attention (params xattn), for concepts named in the prompt (styles, objects); esd-u: ESD-u, "
                    "ESD on everything but the cross-attention (noxattn), for concepts that show unnamed (nudity). "
                    "Both take the official 200 steps at lr 5e-5 in place of method, params, steps and lr.")),
                io.Combo.Input("retain_pairing", options=list(RETAIN_PAIRINGS), default="twins", optional=True,
                               tooltip=("RGD/GA retain batch: twins = each forget prompt's concept-free twin (Ko et al.), "
                                        "plus some of your retain prompts; independent = a random draw from all retain "
                                        "prompts.")),
                *size_inputs("it trains on"),
                io.Combo.Input("official", options=list(OFFICIAL), default="off", optional=True, tooltip=(
                    "off: the pack's procedure. esd: each step as Gandikota et al.'s train-esd.py (rohitgandikota/"
                    "erasing @b8aeab6d): batch 1, x_t from the model's own DDIM sample of the concept (ldm schedule), "
                    "plain ε-MSE, the chosen layers fine-tuned in full (no LoRA); needs method esd. rgd: as Ko et al.'s "
                    "nsfw_RGD.py with run-surgery.sh (reds-lab/Restricted_gradient_diversity_unlearning @0075ecbb): "
                    "forget/retain twins in order, ldm loss, truncation and projection as the script, full fine-tuning; "
                    "needs method rgd. Steps, lr, η, α, m, batch stay yours.")),
            ],
            outputs=[
                output(io.Model, "model", "A copy of the model with the trained edit applied as patches."),
                output(EDIT, "edit", "The trained edit (LoRA pairs or dense deltas) with its loss history."),
                output(io.Image, "loss_plot", "Forget/retain losses per step."),
            ],
            aliases=("erase", "unlearn", "nsfw", "esd", "rgd", "lora", "fine-tune", "remove concept"))

    @classmethod
    def validate_inputs(cls, concept=None, method=None, params=None, steps=None, lr=None, rank=None, alpha=1.6,
                        truncation=1.1, eta=1.0, forget_objective="ascent", batch=4, n_prompts=16, gen_steps=20,
                        preset="custom", retain_pairing="twins", official="off"):
        values = {"method": method, "params": params, "steps": steps, "lr": lr, "rank": rank, "alpha": alpha, "truncation": truncation,
                      "eta": eta, "forget_objective": forget_objective, "batch": batch, "n_prompts": n_prompts,
                      "gen_steps": gen_steps, "preset": preset, "retain_pairing": retain_pairing, "official": official}

        def concept_named():
            if not concept.strip():
                raise InvalidInputError("concept is empty: name the concept to erase, e.g. 'van gogh'")
        config = lambda: _unlearn_config(method, params, steps, lr, rank, 0, alpha, truncation, eta,
                                         forget_objective, batch, n_prompts, gen_steps, preset, retain_pairing,
                                         official).validate()
        return verdict(cls, values, (concept_named, concept), (config, *values.values()))

    @classmethod
    def execute(cls, model, clip, concept, retain_prompts, method, params, steps, lr, rank, seed, alpha=1.6,
                truncation=1.1, eta=1.0, forget_objective="ascent", batch=4, n_prompts=16, gen_steps=20,
                preset="custom", retain_pairing="twins", width=0, height=0, official="off"):
        cfg = _unlearn_config(method, params, steps, lr, rank, seed, alpha, truncation, eta, forget_objective, batch,
                              n_prompts, gen_steps, preset, retain_pairing, official)
        job = UnlearnJob(concept=concept, settings=cfg, width=width, height=height,
                         retain_prompts=prompt_lines(retain_prompts))
        out, _clip, edit, _warnings = run("unlearn", model, clip, job)
        name = preset if preset != "custom" else f"{cfg.method} / {cfg.param_set}"
        plot = history_plot(edit.metrics["history"], f"{name}: {concept}")
        return io.NodeOutput(out, edit, plot, ui=ui.PreviewImage(plot, cls=cls))


def _checkpoints(steps: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in steps.replace(";", ",").split(",") if s.strip())
    except ValueError:
        raise InvalidInputError(f"steps must be numbers separated by commas, e.g. 10,25,50 (got {steps!r})") from None


class ResurgenceAudit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditResurgenceAudit", "Resurgence Audit",
            "Audit an erasure: fine-tune the edited model briefly on benign data (a LoRA, on your own captioned "
            "images, or else on images of the original model) and report how much of the concept comes back. "
            "Works for any edit. Presence is "
            "measured without a classifier: how much of the original's concept direction ε(c)−ε(∅) remains.",
            inputs=[
                *audited_inputs(),
                concept_prompts_input(),
                io.String.Input("benign_prompts", multiline=True, default="\n".join(DEFAULT_BENIGN),
                                tooltip="Prompts unrelated to the concept, to fine-tune on (one per line)."),
                io.String.Input("steps", default="10,25,50",
                                tooltip="Benign fine-tuning steps at which presence is measured."),
                io.Float.Input("lr", default=1e-3, min=1e-7, max=1.0, step=1e-5, tooltip="Learning rate of the benign LoRA."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="Rank of the benign LoRA."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of images and noise."),
                EDIT.Input("edit", optional=True,
                           tooltip="The edit itself; when absent it is read off the two models' weights."),
                io.Image.Input("benign_images", optional=True,
                               tooltip="Your own benign images to fine-tune on (as the paper does with real "
                                       "data); the benign prompts are their captions, one line per image "
                                       "or one for all. Without images the original model generates them, "
                                       "which partly distils the edit away. Needs the VAE."),
                io.String.Input("benign_folder", default="", optional=True,
                                tooltip="A folder of benign images (.png/.jpg/.webp) to "
                                        "fine-tune on, each with a .txt caption beside it "
                                        "(else the benign prompts are the captions). Needs the VAE."),
                io.Vae.Input("vae", optional=True, tooltip="The checkpoint's VAE: encodes the benign images."),
                *size_inputs("it fine-tunes and measures on"),
                io.String.Input("concept", default="", optional=True,
                                tooltip="The erased concept's words (e.g. 'van gogh'; several "
                                        "comma-separated): presence is how much more each concept prompt moves the "
                                        "model's prediction than the same prompt without them. Empty: the connected "
                                        "edit's concepts, or, without an edit, the empty prompt (which also counts the "
                                        "rest of the prompt and reads little of an erasure on flow models)."),
            ],
            outputs=[
                output(io.String, "report", "Presence before/after the edit and after each number of benign steps, "
                                            "and resurgence."),
                output(io.Image, "plot", "Presence against benign fine-tuning steps."),
            ],
            aliases=("audit", "resurgence", "relearning", "erase", "unlearn"))

    @classmethod
    def validate_inputs(cls, concept_prompts=None, steps=None, lr=None, rank=None):
        values = {"lr": lr, "rank": rank}

        def prompts_given():
            if not prompt_lines(concept_prompts):
                raise InvalidInputError("concept_prompts is empty: write the prompts that show the erased concept, "
                                        "one per line")
        config = lambda: AuditConfig(checkpoints=_checkpoints(steps), lr=lr, rank=rank).validate()
        return verdict(cls, values, (prompts_given, concept_prompts), (config, steps, lr, rank))

    @classmethod
    def execute(cls, edited_model, original_model, clip, concept_prompts, benign_prompts, steps, lr, rank, seed,
                edit=None, width=0, height=0, benign_images=None, benign_folder="", vae=None, concept=""):
        cfg = AuditConfig(checkpoints=_checkpoints(steps), lr=lr, rank=rank, seed=seed)
        report = audit_models(edited_model, original_model, clip, prompt_lines(concept_prompts),
                              prompt_lines(benign_prompts), cfg, edit, latent=latent_size(width, height), vae=vae,
                              benign_images=benign_images, benign_folder=benign_folder.strip(),
                              concept=concept.strip() or None)
        plot = audit_plot(report)
        return io.NodeOutput(report.to_text(), plot, ui=ui.PreviewImage(plot, cls=cls))


NODES = [TrainUnlearn, ResurgenceAudit]

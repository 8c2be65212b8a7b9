"""Unlearning by fine-tuning (RGD / gradient ascent / ESD) and the resurgence audit, as nodes.

Training inside ComfyUI: the executor runs under ``torch.inference_mode()``; these nodes re-enable
gradients for the library call only. The library trains hooks on the model as it runs and never
writes its weights (see editing/training.py), so the input MODEL is unchanged also on Cancel.
"""
from __future__ import annotations

import logging

from ..comfy_host.jobs import UnlearnJob, audit_models, latent_size, unlearn
from ..editing.errors import InvalidInputError
from ..editing.training import PARAM_SETS
from ..editing.report.plots import audit_plot, history_plot
from ..editing.audit.resurgence import DEFAULT_BENIGN, AuditConfig
from ..editing.unlearn.trainer import METHODS, OFFICIAL, PRESETS, RETAIN_PAIRINGS, preset_config
from .common import CATEGORY, CONCEPT_PROMPTS, EDIT, audited_inputs, prompt_lines, size_inputs

log = logging.getLogger(__name__)


class TrainUnlearn:
    DESCRIPTION = ("Erase a concept by fine-tuning (RGD of Ko et al. 2024, their gradient-ascent baseline, or ESD "
                   "negative guidance) on images the model generates itself. Trains a small LoRA by default, so the EDIT is a "
                   "shareable file. The input MODEL is never changed; Cancel stops cleanly.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", EDIT, "IMAGE")
    RETURN_NAMES = ("model", "edit", "loss_plot")
    OUTPUT_TOOLTIPS = ("A copy of the model with the trained edit applied as patches.",
                       "The trained edit (LoRA pairs or dense deltas) with its loss history.",
                       "Forget/retain losses per step.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to unlearn from (cloned, never changed)."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
            "concept": ("STRING", {"default": "", "tooltip": "The concept word or phrase to erase, e.g. 'van gogh'."}),
            "retain_prompts": ("STRING", {"multiline": True, "default": "",
                                          "tooltip": "Extra prompts whose outputs must stay as they are (one per line); "
                                                     "templated prompts without the concept are always used."}),
            "method": (list(METHODS), {"default": "rgd", "tooltip": "rgd: ascent on the concept + descent on retain, "
                                       "each gradient projected off the other when they conflict; ga: gradient ascent "
                                       "baseline, −L_forget + 0.1·L_retain; esd: negative guidance from the frozen model, "
                                       "on its own partial samples of the bare concept (Gandikota et al.)."}),
            "params": (list(PARAM_SETS), {"default": "lora", "tooltip": "What trains: lora (every transformer Linear, "
                                          "small file), lora-xattn, xattn (ESD-x, dense cross-attention), noxattn "
                                          "(ESD-u, dense everything else)."}),
            "steps": ("INT", {"default": 100, "min": 1, "max": 100000, "tooltip": "Optimiser steps."}),
            "lr": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-6,
                             "tooltip": "Adam learning rate (the paper: 1e-5 for full fine-tuning of SD; LoRA wants more; "
                                        "on the tiny Flux RGD erased at 1e-3–2e-3 on lora-xattn, ESD-x at 3e-3)."}),
            "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank (lora sets only)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of prompts, images and noise."}),
        }, "optional": {
            "alpha": ("FLOAT", {"default": 1.6, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "RGD: weight α of the retain gradient."}),
            "truncation": ("FLOAT", {"default": 1.1, "min": 0.01, "max": 100.0, "step": 0.05,
                                     "tooltip": "RGD: a forget loss above m is set to the constant 1, so that batch adds no "
                                                "ascent (stops ascent running away)."}),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "ESD: negative-guidance strength η."}),
            "forget_objective": (["ascent", "esd"], {"default": "ascent", "tooltip": "RGD's forget gradient: ascent (the paper) or the ESD target."}),
            "batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Images per forget/retain batch."}),
            "n_prompts": ("INT", {"default": 16, "min": 1, "max": 512, "tooltip": "Templated forget/retain prompt pairs (images generated once per run)."}),
            "gen_steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps used to generate the training images."}),
            "preset": (["custom", *PRESETS], {"default": "custom", "tooltip": (
                "custom: method, params, steps and lr as set above. esd-x: Gandikota et al.'s ESD-x, ESD on the "
                "cross-attention (params xattn), for concepts named in the prompt (styles, objects); esd-u: ESD-u, "
                "ESD on everything but the cross-attention (noxattn), for concepts that show unnamed (nudity). "
                "Both take the official 200 steps at lr 5e-5 in place of method, params, steps and lr.")}),
            "retain_pairing": (list(RETAIN_PAIRINGS), {"default": "twins", "tooltip": (
                "RGD/GA retain batch: twins = each forget prompt's concept-free twin (Ko et al.), plus some of "
                "your retain prompts; independent = a random draw from all retain prompts.")}),
            **size_inputs("it trains on"),
            "official": (list(OFFICIAL), {"default": "off", "tooltip": (
                "off: the pack's procedure. esd: each step as Gandikota et al.'s train-esd.py (rohitgandikota/"
                "erasing @b8aeab6d): batch 1, x_t from the model's own DDIM sample of the concept (ldm schedule), "
                "plain ε-MSE, the chosen layers fine-tuned in full (no LoRA); needs method esd. rgd: as Ko et al.'s "
                "nsfw_RGD.py with run-surgery.sh (reds-lab/Restricted_gradient_diversity_unlearning @0075ecbb): "
                "forget/retain twins in order, ldm loss, truncation and projection as the script, full fine-tuning; "
                "needs method rgd. Steps, lr, η, α, m, batch stay yours.")}),
        }}

    def execute(self, model, clip, concept, retain_prompts, method, params, steps, lr, rank, seed, alpha=1.6,
                truncation=1.1, eta=1.0, forget_objective="ascent", batch=4, n_prompts=16, gen_steps=20,
                preset="custom", retain_pairing="twins", width=0, height=0, official="off"):
        cfg = preset_config(preset, method=method, param_set=params, steps=steps, lr=lr, rank=rank, seed=seed,
                            alpha=alpha, truncation=truncation, eta=eta, forget_objective=forget_objective, batch=batch,
                            n_prompts=n_prompts, gen_steps=gen_steps, retain_pairing=retain_pairing, official=official)
        out, _clip, edit, _warnings = unlearn(model, clip, UnlearnJob(concept=concept, settings=cfg, width=width, height=height,
                                                                 retain_prompts=prompt_lines(retain_prompts)))
        name = preset if preset != "custom" else f"{cfg.method} / {cfg.param_set}"
        return (out, edit, history_plot(edit.metrics["history"], f"{name}: {concept}"))


class ResurgenceAudit:
    DESCRIPTION = ("Audit an erasure: fine-tune the edited model briefly on benign data (a LoRA, on your own captioned "
                   "images, or else on images of the original model) and report how much of the concept comes back. "
                   "Works for any edit. Presence is "
                   "measured without a classifier: how much of the original's concept direction ε(c)−ε(∅) remains.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "plot")
    OUTPUT_TOOLTIPS = ("Presence before/after the edit and after each number of benign steps, and resurgence.",
                       "Presence against benign fine-tuning steps.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **audited_inputs(),
            "concept_prompts": CONCEPT_PROMPTS,
            "benign_prompts": ("STRING", {"multiline": True, "default": "\n".join(DEFAULT_BENIGN),
                                          "tooltip": "Prompts unrelated to the concept, to fine-tune on (one per line)."}),
            "steps": ("STRING", {"default": "10,25,50", "tooltip": "Benign fine-tuning steps at which presence is measured."}),
            "lr": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1.0, "step": 1e-5, "tooltip": "Learning rate of the benign LoRA."}),
            "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "Rank of the benign LoRA."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of images and noise."}),
        }, "optional": {
            "edit": (EDIT, {"tooltip": "The edit itself; when absent it is read off the two models' weights."}),
            "benign_images": ("IMAGE", {"tooltip": "Your own benign images to fine-tune on (as the paper does with real "
                                                   "data); the benign prompts are their captions, one line per image "
                                                   "or one for all. Without images the original model generates them, "
                                                   "which partly distils the edit away. Needs the VAE."}),
            "benign_folder": ("STRING", {"default": "", "tooltip": "A folder of benign images (.png/.jpg/.webp) to "
                                                                    "fine-tune on, each with a .txt caption beside it "
                                                                    "(else the benign prompts are the captions). Needs the VAE."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE: encodes the benign images."}),
            **size_inputs("it fine-tunes and measures on"),
            "concept": ("STRING", {"default": "", "tooltip": "The erased concept's words (e.g. 'van gogh'; several "
                                   "comma-separated): presence is how much more each concept prompt moves the "
                                   "model's prediction than the same prompt without them. Empty: the connected "
                                   "edit's concepts, or, without an edit, the empty prompt (which also counts the "
                                   "rest of the prompt and reads little of an erasure on flow models)."}),
        }}

    def execute(self, edited_model, original_model, clip, concept_prompts, benign_prompts, steps, lr, rank, seed, edit=None,
                width=0, height=0, benign_images=None, benign_folder="", vae=None, concept=""):
        try:
            cps = tuple(int(s) for s in steps.replace(";", ",").split(",") if s.strip())
        except ValueError:
            raise InvalidInputError(f"steps must be numbers separated by commas, e.g. 10,25,50 (got {steps!r})") from None
        cfg = AuditConfig(checkpoints=cps, lr=lr, rank=rank, seed=seed)
        report = audit_models(edited_model, original_model, clip, prompt_lines(concept_prompts), prompt_lines(benign_prompts), cfg, edit,
                              latent=latent_size(width, height), vae=vae, benign_images=benign_images,
                              benign_folder=benign_folder.strip(), concept=concept.strip() or None)
        return (report.to_text(), audit_plot(report))


NODE_CLASS_MAPPINGS = {
    "ConceptEditTrainUnlearn": TrainUnlearn,
    "ConceptEditResurgenceAudit": ResurgenceAudit,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptEditTrainUnlearn": "Unlearn Concept (RGD / ESD, train)",
    "ConceptEditResurgenceAudit": "Resurgence Audit",
}

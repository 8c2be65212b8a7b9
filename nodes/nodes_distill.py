"""Bilevel distill-and-unlearn (Shirkavand et al. 2024) as a node: a pruned student is distilled
from the full teacher while the concept is erased from it."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.jobs import DistillJob, run
from ..editing.distill.config import FEATURE_KD, KEEP_PRUNED, OFFICIAL, DistillConfig
from ..editing.report.plots import history_plot
from ..editing.training import PARAM_SETS
from .common import EDIT, node_schema, output, prompt_lines, size_inputs, verdict


def _config(concept, steps, erase_every, lr, params, rank, seed, batch, n_prompts, gen_steps, keep_pruned, feature_kd,
            min_snr_gamma, erase_lr, warmup_steps, official) -> DistillConfig:
    return DistillConfig(steps=steps, erase_every=erase_every, lr_distill=lr, lr_erase=erase_lr or lr,
                         param_set=params, rank=rank, seed=seed, batch=batch, n_prompts=n_prompts,
                         gen_steps=gen_steps, erase=bool(concept.strip()), keep_pruned=keep_pruned,
                         feature_kd=feature_kd, min_snr_gamma=min_snr_gamma, warmup_steps=warmup_steps,
                         official=official)


class DistillUnlearn(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditDistillUnlearn", "Distill and Unlearn (pruned student, bilevel)",
            "Distil a pruned or smaller student from the full teacher while erasing a concept from it "
            "(bilevel distill-and-unlearn, Shirkavand et al. 2024): 9 distillation steps (Min-SNR-weighted "
            "diffusion loss + output KD + feature KD averaged over the UNet's level outputs, on the teacher's "
            "own pictures), then 1 erase step (ESD target from the teacher), repeated, each kind with its own "
            "AdamW. The student is the output of ConceptPrune / Apply Concept Edit on the teacher, or a model "
            "of its own (blocks removed, other widths) using the same CLIP. Weights the pruning zeroed stay "
            "zero. Neither input is changed; Cancel stops cleanly.",
            inputs=[
                io.Model.Input("student", tooltip="The pruned or smaller model to train (cloned, never changed)."),
                io.Model.Input("teacher", tooltip="The full model it is distilled from."),
                io.Clip.Input("clip", tooltip="The text encoder both models read."),
                io.String.Input("concept", default="", tooltip="The concept to erase while distilling, e.g. 'van gogh'."),
                io.String.Input("distill_prompts", multiline=True, default="",
                                tooltip="Prompts of the distillation pictures, one per line (they should "
                                        "not show the concept); empty: the concept-free twins of the "
                                        "templated erase prompts."),
                io.Int.Input("steps", default=100, min=1, max=100000, tooltip="Optimiser steps in all."),
                io.Int.Input("erase_every", default=10, min=2, max=1000,
                             tooltip="Every n-th step is an erase step (10: 9 distillation steps, then "
                                     "1); official bilevel adds it after every n-th distillation step."),
                io.Float.Input("lr", default=1e-3, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Learning rate of the distillation optimiser, and of the erase one "
                                       "unless erase_lr is set."),
                io.Combo.Input("params", options=list(PARAM_SETS), default="lora",
                               tooltip="What trains (as in Unlearn Concept)."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (lora sets only)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of prompts, pictures and noise."),
                io.Int.Input("batch", default=4, min=1, max=64, optional=True, tooltip="Pictures per step."),
                io.Int.Input("n_prompts", default=16, min=1, max=512, optional=True, tooltip="Templated erase prompts."),
                io.Int.Input("gen_steps", default=20, min=1, max=200, optional=True,
                             tooltip="Sampling steps of the teacher's training pictures."),
                io.Combo.Input("keep_pruned", options=list(KEEP_PRUNED), default="mask", optional=True,
                               tooltip="mask: weights the pruning zeroed stay exactly zero (the LoRA is masked there; "
                                       "a layer pruned in scattered weights, as ConceptPrune does, is saved as a dense "
                                       "change); skip: the pruned layers are not trained (small file); off: the LoRA "
                                       "may regrow pruned weights (the earlier behaviour)."),
                io.Combo.Input("feature_kd", options=list(FEATURE_KD), default="levels", optional=True,
                               tooltip="levels: feature KD is the mean over the UNet's level outputs (every down "
                                       "level, the middle block, every up level: 9 on SD1.x, 7 on SDXL), as the "
                                       "paper's code; blocks: the sum over every transformer block (earlier form)."),
                io.Float.Input("min_snr_gamma", default=5.0, min=0.0, max=100.0, step=0.5, optional=True,
                               tooltip="Min-SNR-γ weighting of the diffusion loss (5 as in the paper); "
                                       "0 = the model's own objective (ε-MSE; velocity MSE on Flux / SD3)."),
                *size_inputs("the teacher generates for training"),
                io.Float.Input("erase_lr", default=0.0, min=0.0, max=1.0, step=1e-6, optional=True,
                               tooltip="Learning rate of the erase optimiser; 0 = lr (the official configs: "
                                       "1e-6 distillation, 5e-6 erase)."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="Linear warm-up of both learning rates over this many of each "
                                     "optimiser's steps (the official configs: 250); 0 = none."),
                io.Combo.Input("official", options=list(OFFICIAL), default="off", optional=True, tooltip=(
                    "off: the pack's procedure. bilevel: the loop of the official code (rezashkv/unlearn-ft "
                    "BilevelUnetFineTuner @7a9f282d): a distillation step every step plus an erase step after every "
                    "erase_every-th, η 1, shuffled batches without replacement, the student's layers fine-tuned in full "
                    "(no LoRA), pruned weights kept at zero. Steps, lrs, warm-up, loss weights, γ stay yours.")),
            ],
            outputs=[
                output(io.Model, "student", "A copy of the student with the trained part applied as patches."),
                output(EDIT, "edit", "The trained part (LoRA pairs by default) with its loss history; apply it to the "
                                     "same student."),
                output(io.Image, "loss_plot", "Distillation and erase losses per step."),
            ],
            aliases=("distill", "distillation", "unlearn", "erase", "prune", "lora"))

    @classmethod
    def validate_inputs(cls, concept=None, steps=None, erase_every=None, lr=None, params=None, rank=None, batch=4,
                        n_prompts=16, gen_steps=20, keep_pruned="mask", feature_kd="levels", min_snr_gamma=5.0,
                        erase_lr=0.0, warmup_steps=0, official="off"):
        values = {"steps": steps, "erase_every": erase_every, "lr": lr, "params": params, "rank": rank, "batch": batch,
                      "n_prompts": n_prompts, "gen_steps": gen_steps, "keep_pruned": keep_pruned, "feature_kd": feature_kd,
                      "min_snr_gamma": min_snr_gamma, "erase_lr": erase_lr, "warmup_steps": warmup_steps, "official": official}
        config = lambda: _config(concept, steps, erase_every, lr, params, rank, 0, batch, n_prompts,
                                 gen_steps, keep_pruned, feature_kd, min_snr_gamma, erase_lr, warmup_steps,
                                 official).validate()
        return verdict(cls, values, (config, concept, *values.values()))

    @classmethod
    def execute(cls, student, teacher, clip, concept, distill_prompts, steps, erase_every, lr, params, rank, seed,
                batch=4, n_prompts=16, gen_steps=20, keep_pruned="mask", feature_kd="levels", min_snr_gamma=5.0,
                width=0, height=0, erase_lr=0.0, warmup_steps=0, official="off"):
        cfg = _config(concept, steps, erase_every, lr, params, rank, seed, batch, n_prompts, gen_steps, keep_pruned,
                      feature_kd, min_snr_gamma, erase_lr, warmup_steps, official)
        job = DistillJob(teacher=teacher, concept=concept, settings=cfg, distill_prompts=prompt_lines(distill_prompts),
                         width=width, height=height)
        out, _clip, edit, _warnings = run("distill_unlearn", student, clip, job)
        hist = edit.metrics["history"]
        plot = history_plot({"distill": hist["distill"], "erase": [loss for _, loss in hist["erase"]]},
                            f"distill-unlearn: {concept or '(distillation only)'}")
        return io.NodeOutput(out, edit, plot, ui=ui.PreviewImage(plot, cls=cls))


NODES = [DistillUnlearn]

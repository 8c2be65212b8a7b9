"""The red-team audit as a node: prompt attacks (and, for pruning masks, weight revival) against an
edit, next to the Resurgence Audit. The attacks optimise a few soft token embeddings with gradients
(re-enabled for the library call only); the models' weights are never written."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.jobs import latent_size
from ..comfy_host.audits import red_team_grid, red_team_models
from ..editing.errors import InvalidInputError
from ..editing.redteam.runner import ATTACKS, RedTeamConfig
from ..editing.redteam.soft import AttackConfig
from .common import (
    CFG_NOTE,
    EDIT,
    audited_inputs,
    concept_prompts_input,
    node_schema,
    output,
    prompt_lines,
    size_inputs,
    verdict,
)


def _config(prefix, embedding_match, inversion, revival, steps, tokens, lr, samples, sample_steps, cfg, seed,
            time_limit_s) -> RedTeamConfig:
    on = {"prefix": prefix, "embedding_match": embedding_match, "inversion": inversion}
    return RedTeamConfig(attacks=tuple(a for a in ATTACKS if on[a]), revival=revival, attack=AttackConfig(
        steps=steps, tokens=tokens, lr=lr, samples=samples, images=samples, sample_steps=sample_steps, cfg=cfg,
        seed=seed, time_limit_s=time_limit_s))


class RedTeamAudit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditRedTeamAudit", "Red-Team Audit (prompt attacks)",
            "Try to bring an erased concept back with prompts: an adversarial prefix the edited model reads as "
            "the concept (UnlearnDiffAtk), a soft prompt matching the original model's prediction (P4D), a "
            "new word learned on concept pictures (concept inversion), and for pruning masks how few restored "
            "weights revive it. Reports presence per attack, the prompt each found, and a picture grid.",
            inputs=[
                *audited_inputs(),
                io.String.Input("concept", default="", tooltip="The erased concept's words (e.g. 'van gogh'): taken "
                                "out of the prompts for the model's own presence score."),
                concept_prompts_input(),
                io.Boolean.Input("prefix", default=True, tooltip="Adversarial prefix (UnlearnDiffAtk): soft tokens "
                                 "before the prompt, optimised so the edited model denoises concept pictures."),
                io.Boolean.Input("embedding_match", default=True, tooltip="Soft prompt matching the original model's "
                                 "prediction for the concept prompt (P4D)."),
                io.Boolean.Input("inversion", default=True, tooltip="A new word learned on the original's concept "
                                 "pictures against the edited model (concept inversion)."),
                io.Boolean.Input("revival", default=True, tooltip="Pruning masks only: restore 1 %, 5 %, ... of the "
                                 "pruned weights (largest first) and read the concept's presence."),
                io.Int.Input("steps", default=40, min=1, max=5000, tooltip="Optimisation steps per attack (the budget)."),
                io.Int.Input("tokens", default=0, min=0, max=64, tooltip="Soft tokens per attack; 0 = each attack's "
                             "own (prefix 5, embedding match 16, inversion 1)."),
                io.Float.Input("lr", default=0.01, min=1e-5, max=10.0, step=0.001,
                               tooltip="Adam's step size on the soft tokens."),
                io.Int.Input("samples", default=4, min=1, max=64, tooltip="Pictures per row (each attack, the "
                             "original, the edited model) and concept pictures the attacks target."),
                io.Int.Input("sample_steps", default=20, min=1, max=200, tooltip="DDIM steps per picture."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.5,
                               tooltip="Classifier-free guidance." + CFG_NOTE),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of pictures, noise and initial tokens."),
                EDIT.Input("edit", optional=True, tooltip="The edit itself; when absent its UNet part is read off the "
                           "two models' weights. A text-encoder edit needs it (or the edited CLIP)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the picture grid (without it the grid shows the "
                             "latents' first three channels)."),
                io.Clip.Input("edited_clip", optional=True,
                              tooltip="The edited text encoder, for a text-encoder edit (EMCID)."),
                io.Float.Input("time_limit_s", default=0.0, min=0.0, max=86400.0, optional=True,
                               tooltip="Stop each attack after this many seconds (0 = only the step budget)."),
                *size_inputs("it attacks and draws at"),
            ],
            outputs=[
                output(io.String, "report", "Presence of the concept: original, edited, and under each attack (soft "
                                            "prompt and its nearest real words), with the prompt found and whether "
                                            "the attack succeeded."),
                output(io.Image, "grid", "Rows: the original model's concept pictures, the edited model's, then one "
                                         "row per attack."),
                output(io.Float, "attack_success", "The share of the chosen attacks that brought the concept back, as "
                                                   "a soft prompt or as its nearest real words."),
            ],
            aliases=("audit", "attack", "jailbreak", "adversarial", "nsfw", "erase", "unlearn"))

    @classmethod
    def validate_inputs(cls, concept_prompts=None, prefix=None, embedding_match=None, inversion=None, revival=None,
                        steps=None, tokens=None, lr=None, samples=None, sample_steps=None):
        values = {"steps": steps, "tokens": tokens, "lr": lr, "samples": samples, "sample_steps": sample_steps}

        def prompts_given():
            if not prompt_lines(concept_prompts):
                raise InvalidInputError("concept_prompts is empty: write the prompts that show the erased concept, "
                                        "one per line")

        config = lambda: _config(prefix, embedding_match, inversion, revival, steps, tokens, lr, samples,
                                 sample_steps, 7.5, 0, 0.0).validate()
        return verdict(cls, values, (prompts_given, concept_prompts),
                       (config, prefix, embedding_match, inversion, revival, *values.values()))

    @classmethod
    def execute(cls, edited_model, original_model, clip, concept, concept_prompts, prefix, embedding_match,
                inversion, revival, steps, tokens, lr, samples, sample_steps, cfg, seed, edit=None, vae=None,
                edited_clip=None, time_limit_s=0.0, width=0, height=0):
        config = _config(prefix, embedding_match, inversion, revival, steps, tokens, lr, samples, sample_steps, cfg,
                         seed, time_limit_s)
        report = red_team_models(edited_model, original_model, clip, prompt_lines(concept_prompts), config, edit=edit,
                                 edited_clip=edited_clip, concept=concept, latent=latent_size(width, height))
        grid = red_team_grid(report, original_model, vae)
        text = report.to_text()
        return io.NodeOutput(text, grid, report.success_rate(), ui=ui.PreviewText(text))


NODES = [RedTeamAudit]

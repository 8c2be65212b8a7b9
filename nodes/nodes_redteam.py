"""The red-team audit as a node: prompt attacks (and, for pruning masks, weight revival) against an
edit, next to the Resurgence Audit. The attacks optimise a few soft token embeddings with gradients
(re-enabled for the library call only); the models' weights are never written."""
from __future__ import annotations

from ..comfy_host.jobs import latent_size, red_team_grid, red_team_models
from ..editing.redteam.runner import ATTACKS, RedTeamConfig
from ..editing.redteam.soft import AttackConfig
from .common import CATEGORY, CFG_NOTE, CONCEPT_PROMPTS, EDIT, audited_inputs, prompt_lines, size_inputs


class RedTeamAudit:
    DESCRIPTION = ("Try to bring an erased concept back with prompts: an adversarial prefix the edited model reads as "
                   "the concept (UnlearnDiffAtk), a soft prompt matching the original model's prediction (P4D), a "
                   "new word learned on concept pictures (concept inversion), and for pruning masks how few restored "
                   "weights revive it. Reports presence per attack, the prompt each found, and a picture grid.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE", "FLOAT")
    RETURN_NAMES = ("report", "grid", "attack_success")
    OUTPUT_TOOLTIPS = ("Presence of the concept: original, edited, and under each attack (soft prompt and its nearest "
                       "real words), with the prompt found and whether the attack succeeded.",
                       "Rows: the original model's concept pictures, the edited model's, then one row per attack.",
                       "The share of the chosen attacks that brought the concept back, as a soft prompt or as its "
                       "nearest real words.")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **audited_inputs(),
            "concept": ("STRING", {"default": "", "tooltip": "The erased concept's words (e.g. 'van gogh'): taken out "
                                   "of the prompts for the model's own presence score."}),
            "concept_prompts": CONCEPT_PROMPTS,
            "prefix": ("BOOLEAN", {"default": True, "tooltip": "Adversarial prefix (UnlearnDiffAtk): soft tokens before "
                                   "the prompt, optimised so the edited model denoises concept pictures."}),
            "embedding_match": ("BOOLEAN", {"default": True, "tooltip": "Soft prompt matching the original model's "
                                            "prediction for the concept prompt (P4D)."}),
            "inversion": ("BOOLEAN", {"default": True, "tooltip": "A new word learned on the original's concept "
                                      "pictures against the edited model (concept inversion)."}),
            "revival": ("BOOLEAN", {"default": True, "tooltip": "Pruning masks only: restore 1 %, 5 %, ... of the pruned "
                                    "weights (largest first) and read the concept's presence."}),
            "steps": ("INT", {"default": 40, "min": 1, "max": 5000, "tooltip": "Optimisation steps per attack (the budget)."}),
            "tokens": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Soft tokens per attack; 0 = each attack's "
                               "own (prefix 5, embedding match 16, inversion 1)."}),
            "lr": ("FLOAT", {"default": 0.01, "min": 1e-5, "max": 10.0, "step": 0.001, "tooltip": "Adam's step size on the soft tokens."}),
            "samples": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Pictures per row (each attack, the "
                                "original, the edited model) and concept pictures the attacks target."}),
            "sample_steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "DDIM steps per picture."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip": "Classifier-free guidance." + CFG_NOTE}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of pictures, noise and initial tokens."}),
        }, "optional": {
            "edit": (EDIT, {"tooltip": "The edit itself; when absent its UNet part is read off the two models' weights. "
                                      "A text-encoder edit needs it (or the edited CLIP)."}),
            "vae": ("VAE", {"tooltip": "Decodes the picture grid (without it the grid shows the latents' first "
                                       "three channels)."}),
            "edited_clip": ("CLIP", {"tooltip": "The edited text encoder, for a text-encoder edit (EMCID)."}),
            "time_limit_s": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0, "tooltip": "Stop each attack after "
                                       "this many seconds (0 = only the step budget)."}),
            **size_inputs("it attacks and draws at"),
        }}

    def execute(self, edited_model, original_model, clip, concept, concept_prompts, prefix, embedding_match,
                inversion, revival, steps, tokens, lr, samples, sample_steps, cfg, seed, edit=None, vae=None,
                edited_clip=None, time_limit_s=0.0, width=0, height=0):
        on = {"prefix": prefix, "embedding_match": embedding_match, "inversion": inversion}
        chosen = tuple(a for a in ATTACKS if on[a])
        config = RedTeamConfig(attacks=chosen, revival=revival, attack=AttackConfig(
            steps=steps, tokens=tokens, lr=lr, samples=samples, images=samples, sample_steps=sample_steps, cfg=cfg,
            seed=seed, time_limit_s=time_limit_s))
        report = red_team_models(edited_model, original_model, clip, prompt_lines(concept_prompts), config, edit=edit,
                                 edited_clip=edited_clip, concept=concept, latent=latent_size(width, height))
        grid = red_team_grid(report, original_model, vae)
        return {"ui": {"text": [report.to_text()]}, "result": (report.to_text(), grid, report.success_rate())}


NODE_CLASS_MAPPINGS = {"ConceptEditRedTeamAudit": RedTeamAudit}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptEditRedTeamAudit": "Red-Team Audit (prompt attacks)"}

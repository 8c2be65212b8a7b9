"""Closed-form cross-attention edit (UCE-style) and Export LoRA nodes."""
from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..comfy_host.jobs import UCEJob, export_lora, run
from ..editing.export.lora import DTYPES, LoraExportConfig
from ..editing.uce.config import (DebiasConfig, EMPTY_GUIDES, EXPANSIONS, LAM_MODES, MODES, OFFICIAL,
                                  OFFICIAL_SOURCES, TOKEN_WINDOWS, UCEConfig)
from ..editing.uce.closed_form import _plan as plan_targets
from ..editing.uce.debias import report_text
from .common import (
    CFG_NOTE,
    EDIT,
    concepts_from_text,
    node_schema,
    output,
    size_inputs,
    strength_input,
    unique_path,
    verdict,
)

LAM_MODE_TIP = ("How lam counts. absolute: the paper's λ, in the squared units of the text embeddings (the "
                "same edit as UCE's code). relative: λ times the mean square per coordinate of the text rows the "
                "edit reads, so a value means the same on a text encoder whose outputs are larger or smaller "
                "(about 1 on layer-normed CLIP outputs, where both give nearly the same edit). The edit's metrics "
                "(lam_used) record both.")


OFFICIAL_TIP = ("off: the pack's procedure. Any other value runs an official script of "
                "rohitgandikota/unified-concept-editing step by step: "
                + "; ".join(f"{k}: {v}" for k, v in OFFICIAL_SOURCES.items())
                + ". concepts, guide, preserve, lam, the scales and expand stay yours (the scripts' defaults: lam 0.5, "
                "erase_scale 1, preserve_scale 1 in uce_sd_erase, max(0.1, 1/(1 + preserve prompts)) in train_erase); "
                "the script decides the rest: uce_sd_erase edits each concept's last word token (an empty guide: "
                "BOS), train_erase its last word through the padding lined up with the guide's; the preserve lines "
                "are used as given (repeats counted, a line \"\" is the empty prompt), with no default prompts and "
                "no extra empty-prompt rows (train_erase always keeps \"\" at every position). Changed settings "
                "the script has no place for are ignored and named in the edit's warnings.")


def loras_dir() -> str:
    import folder_paths
    path = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(path, exist_ok=True)
    return path


def _uce_config(concepts, mode, guide, preserve, default_preserve, lam, erase_scale, preserve_scale, token_window,
                expand="none", empty_guide="eos", harden_rounds=0, edit_text_tokens=True, edit_text_pooled=False,
                lam_mode="absolute", preserve_unconditional=True, official="off") -> UCEConfig:
    return UCEConfig(concepts=concepts_from_text(concepts), mode=mode, guide=guide, preserve=concepts_from_text(preserve),
                     default_preserve=default_preserve, lam=lam, lam_mode=lam_mode, erase_scale=erase_scale,
                     preserve_scale=preserve_scale, token_window=token_window, expand=expand,
                     empty_guide=empty_guide, harden_rounds=harden_rounds, edit_text_tokens=edit_text_tokens,
                     edit_text_pooled=edit_text_pooled, preserve_unconditional=preserve_unconditional,
                     official=official)


def _check_uce(cfg: UCEConfig) -> None:
    """The config's own checks and the concept lines it reads (a line '-> x' has no concept)."""
    cfg.validate()
    plan_targets(cfg)


def _lam_input(tooltip: str, optional: bool = False) -> io.Float.Input:
    return io.Float.Input("lam", default=0.5, min=0.0, max=1000.0, step=0.05, optional=optional, tooltip=tooltip)


def _preserve_inputs(optional: bool, default_tip: str) -> list[io.Input]:
    return [io.String.Input("preserve", multiline=True, default="", optional=optional,
                            tooltip="Concepts that must stay unchanged (one per line), added to the defaults."),
            io.Boolean.Input("default_preserve", default=True, optional=optional, tooltip=default_tip)]


class CrossAttentionEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditCrossAttentionEdit", "Cross-Attention Edit (UCE closed form)",
            "Closed-form edit of every cross-attention key/value projection (UCE): erase, redirect, "
            "debias or moderate many concepts at once in seconds, keeping a preserve set unchanged. "
            "On DiTs without cross-attention it edits the layer the text enters through instead: Flux/SD3's "
            "per-token projection (txt_in / context_embedder) and the pooled one (vector_in / y_embedder), "
            "Qwen-Image's txt_in, Z-Image's and Lumina 2's cap_embedder, Wan's text_embedding, PixArt's "
            "y_embedder, AuraFlow's cond_seq_linear, HunyuanImage's txt_in (HiDream is refused). "
            "The input MODEL is not modified; the EDIT carries the change and its preservation metrics.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit (cloned, never changed)."),
                io.Clip.Input("clip", tooltip="The model's text encoder: it encodes the concepts, guides and preserve "
                              "prompts."),
                io.String.Input("concepts", multiline=True, default="",
                                tooltip="One concept per line (or comma-separated). 'source -> target' gives a line "
                                        "its own guide."),
                io.Combo.Input("mode", options=list(MODES), default="erase",
                               tooltip="erase: concept -> guide (default the empty prompt); "
                                       "redirect: concept -> another concept; debias: mix the guide's options; "
                                       "moderate: every concept -> unconditional."),
                io.String.Input("guide", default="", tooltip="erase/redirect: what the concepts become (empty = "
                                "unconditional). debias: options with weights, e.g. 'male:0.5, female:0.5'. Ignored "
                                "by moderate."),
                *_preserve_inputs(False, "Also preserve ~30 generic prompts (a photo, a person, a dog, ...)."),
                _lam_input("λ: how strongly every direction stays at the original weights (the paper: "
                           "0.5). Counted as lam_mode says: absolute (the paper's units, squared text-"
                           "embedding units) or relative to the mean square of the text rows."),
                io.Float.Input("erase_scale", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the edited concepts' targets (s_e)."),
                io.Float.Input("preserve_scale", default=0.1, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of keeping the preserve prompts unchanged (s_p). The "
                                       "official scripts' default is 1 (uce_sd_erase; erase_scale 1 too): "
                                       "set it when official is on."),
                io.Combo.Input("token_window", options=list(TOKEN_WINDOWS), default="auto",
                               tooltip="auto: aligned on CLIP text, eos on "
                               "T5 text (Flux, SD3); aligned: edit the concept's words, EOS and padding (strongest on "
                               "CLIP); eos: its words through EOS (cheapest for thousands of concepts); last: only the "
                               "last word token (the newer UCE code)."),
                io.Combo.Input("expand", options=list(EXPANSIONS), default="none", optional=True,
                               tooltip="Also edit each concept in the official "
                               "templates: artist ('painting by X', 'art by X', 'artwork by X', 'picture by X', 'style "
                               "of X'; an empty guide becomes 'art') or object ('image/photo/portrait/picture/painting "
                               "of X')."),
                io.Combo.Input("empty_guide", options=list(EMPTY_GUIDES), default="eos", optional=True,
                               tooltip="With the 'last' window and an empty "
                               "guide: map the concept's last token to the empty prompt's EOS (eos) or, as the official "
                               "code does, to its BOS (bos)."),
                io.Int.Input("harden_rounds", default=0, min=0, max=20, optional=True,
                             tooltip="RECE hardening: after the edit, "
                             "find in closed form the embedding that brings each erased concept back through the "
                             "edited layers, erase it too and re-solve; this many rounds (0 = off). Resists prompt "
                             "attacks at some cost to the preserve set (check the Red-Team Audit)."),
                io.Boolean.Input("edit_text_tokens", default=True, optional=True,
                                 tooltip="DiTs only: edit the per-token text "
                                 "projection (Flux txt_in, SD3 context_embedder, ...), where the prompt's words enter."),
                io.Boolean.Input("edit_text_pooled", default=False, optional=True,
                                 tooltip="Flux/SD3 only: also edit the pooled CLIP "
                                 "projection (Flux vector_in, SD3 y_embedder). Off by default: pooled vectors of "
                                 "different prompts point almost the same way, so this edit moves every prompt, and "
                                 "on the tiny Flux it weakened the erasure."),
                io.Combo.Input("lam_mode", options=list(LAM_MODES), default="absolute", optional=True,
                               tooltip=LAM_MODE_TIP),
                io.Boolean.Input("preserve_unconditional", default=True, optional=True,
                                 tooltip="Keep the empty prompt's keys/values "
                                 "at every position the edit touches, not only its BOS: classifier-free "
                                 "guidance subtracts the empty prompt from every prompt, so a moved one shifts "
                                 "them all. Off: only its BOS is kept."),
                io.Combo.Input("official", options=list(OFFICIAL), default="off", optional=True, tooltip=OFFICIAL_TIP),
            ],
            outputs=[
                output(io.Model, "model", "A copy of the model with the edit applied as patches."),
                output(EDIT, "edit", "The edit (low-rank or dense per layer) with metrics: preserve_rel_change_mean is "
                                     "how much the preserve prompts' keys/values moved."),
            ],
            aliases=("erase", "unlearn", "nsfw", "uce", "redirect", "debias", "moderate", "remove concept"))

    @classmethod
    def validate_inputs(cls, concepts=None, mode=None, guide=None, preserve=None, lam=None, erase_scale=None,
                        preserve_scale=None, token_window=None, expand="none", empty_guide="eos", harden_rounds=0,
                        lam_mode="absolute", official="off"):
        values = {"mode": mode, "lam": lam, "erase_scale": erase_scale, "preserve_scale": preserve_scale,
                      "token_window": token_window, "expand": expand, "empty_guide": empty_guide, "harden_rounds": harden_rounds,
                      "lam_mode": lam_mode, "official": official}
        cfg = lambda: _uce_config(concepts, mode, guide, preserve, True, lam, erase_scale, preserve_scale,
                                  token_window, expand, empty_guide, harden_rounds, lam_mode=lam_mode,
                                  official=official)
        return verdict(cls, values, (lambda: _check_uce(cfg()), concepts, guide, preserve, *values.values()))

    @classmethod
    def execute(cls, model, clip, concepts, mode, guide, preserve, default_preserve, lam, erase_scale,
                preserve_scale, token_window, expand="none", empty_guide="eos", harden_rounds=0,
                edit_text_tokens=True, edit_text_pooled=False, lam_mode="absolute", preserve_unconditional=True,
                official="off"):
        cfg = _uce_config(concepts, mode, guide, preserve, default_preserve, lam, erase_scale, preserve_scale,
                          token_window, expand, empty_guide, harden_rounds, edit_text_tokens, edit_text_pooled,
                          lam_mode, preserve_unconditional, official)
        out = run("uce", model, clip, UCEJob(settings=cfg))
        return io.NodeOutput(out.model, out.edit)


class UCEDebias(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditUCEDebias", "Debias (UCE, closed loop)",
            "Debias concepts with UCE in a closed loop (the paper's procedure): edit, generate each concept, "
            "let a judge read which option every picture shows, move the option weights by the gap to the "
            "target shares, re-solve from the original weights; stop when every gap is within tolerance. "
            "Judge: a CLIP vision model scored against the options with this checkpoint's own text tower "
            "(where they pair: SDXL's CLIP-G with clip_vision_g), else the model itself (presence).",
            inputs=[
                io.Model.Input("model", tooltip="The model to debias (cloned, never changed)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (also the judge's text tower with clip_vision)."),
                io.String.Input("concepts", multiline=True, default="a doctor",
                                tooltip="Concepts to debias, one per line; each is also the prompt generated."),
                io.String.Input("options", default="male:0.5, female:0.5",
                                tooltip="The attribute options with their target shares, e.g. 'male:0.5, female:0.5'."),
                io.Float.Input("tolerance", default=0.05, min=0.0, max=0.99, step=0.01,
                               tooltip="Stop when every share is within this of its target (paper code: 0.05)."),
                io.Int.Input("max_iterations", default=10, min=0, max=100,
                             tooltip="Re-solves after the static mix (0 = the static mix only; paper code: 30)."),
                io.Int.Input("samples", default=10, min=1, max=256,
                             tooltip="Pictures per concept per round (paper code: 10). More = steadier shares."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampler steps per picture."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance scale of the pictures." + CFG_NOTE),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed, the same every round (rounds differ only by the edit)."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="The judge: a CLIP vision model whose space "
                                    "pairs with the CLIP's text tower (SDXL + clip_vision_g). Not connected: the model "
                                    "judges by presence."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the pictures for clip_vision; not needed without it."),
                *_preserve_inputs(True, "Also preserve ~30 generic prompts."),
                io.Float.Input("step_size", default=1.0, min=0.01, max=10.0, step=0.05, optional=True,
                               tooltip="η in weight += η × (target − share) (paper code: 1)."),
                _lam_input("λ of the closed form, counted as lam_mode says.", optional=True),
                io.Float.Input("erase_scale", default=1.0, min=0.0, max=100.0, step=0.05, optional=True, tooltip="s_e."),
                io.Float.Input("preserve_scale", default=0.1, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="s_p."),
                io.Combo.Input("token_window", options=list(TOKEN_WINDOWS), default="auto", optional=True,
                               tooltip="Which tokens of each concept are edited (auto: aligned on CLIP, eos on T5)."),
                strength_input(optional=True),
                *size_inputs("the loop generates"),
                io.Combo.Input("lam_mode", options=list(LAM_MODES), default="absolute", optional=True,
                               tooltip=LAM_MODE_TIP),
            ],
            outputs=[
                output(io.Model, "model", "A copy of the model with the chosen round's edit applied as patches."),
                output(EDIT, "edit", "The edit; metrics.debias holds every round's weights and shares."),
                output(io.String, "report", "The shares per round: unedited, static mix (round 0), the loop's rounds."),
            ],
            aliases=("debias", "bias", "fairness", "uce"))

    @classmethod
    def _configs(cls, concepts, options, tolerance, max_iterations, samples, steps, cfg, seed, preserve,
                 default_preserve, step_size, lam, erase_scale, preserve_scale, token_window, lam_mode):
        settings = _uce_config(concepts, "debias", options, preserve, default_preserve, lam, erase_scale,
                               preserve_scale, token_window, lam_mode=lam_mode)
        loop = DebiasConfig(tolerance=tolerance, max_iterations=max_iterations, step_size=step_size, samples=samples,
                            steps=steps, cfg=cfg, seed=seed)
        return settings, loop

    @classmethod
    def validate_inputs(cls, concepts=None, options=None, tolerance=None, max_iterations=None, samples=None,
                        steps=None, preserve="", step_size=1.0, lam=0.5, erase_scale=1.0, preserve_scale=0.1,
                        token_window="auto", lam_mode="absolute"):
        values = {"tolerance": tolerance, "max_iterations": max_iterations, "samples": samples, "steps": steps,
                      "step_size": step_size, "lam": lam, "erase_scale": erase_scale, "preserve_scale": preserve_scale,
                      "token_window": token_window, "lam_mode": lam_mode}

        def check():
            settings, loop = cls._configs(concepts, options, tolerance, max_iterations, samples, steps, 7.5, 0,
                                          preserve, True, step_size, lam, erase_scale, preserve_scale, token_window,
                                          lam_mode)
            _check_uce(settings)
            loop.validate()
        return verdict(cls, values, (check, concepts, options, preserve, *values.values()))

    @classmethod
    def execute(cls, model, clip, concepts, options, tolerance, max_iterations, samples, steps, cfg, seed,
                clip_vision=None, vae=None, preserve="", default_preserve=True, step_size=1.0, lam=0.5,
                erase_scale=1.0, preserve_scale=0.1, token_window="auto", strength=1.0, width=0, height=0,
                lam_mode="absolute"):
        settings, loop = cls._configs(concepts, options, tolerance, max_iterations, samples, steps, cfg, seed,
                                      preserve, default_preserve, step_size, lam, erase_scale, preserve_scale,
                                      token_window, lam_mode)
        out = run("uce", model, clip, UCEJob(settings=settings, loop=loop, judge=clip_vision, vae=vae, strength=strength,
                                             width=width, height=height))
        text = report_text(out.edit)
        return io.NodeOutput(out.model, out.edit, text, ui=ui.PreviewText(text))


class ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return node_schema(
            "ConceptEditExportLoRA", "Export Edit as LoRA",
            "Write an edit as a LoRA file in models/loras that stock LoraLoader, Automatic1111 and diffusers "
            "load. Low-rank edits are exact; dense ones are compressed by SVD (the error is reported); "
            "pruning masks become full '.diff' modules and need the MODEL/CLIP they were made for.",
            inputs=[
                EDIT.Input("edit", tooltip="The edit to export (from any ConceptEdit method or Load Edit)."),
                io.String.Input("filename", default="concept_edit_lora",
                                tooltip="File name in models/loras (no extension); never overwrites."),
                io.Int.Input("rank", default=0, min=0, max=4096, tooltip="Cap on the rank per layer; 0 = exact for "
                             "low-rank edits and the smallest rank within max_rel_error for dense ones."),
                io.Float.Input("max_rel_error", default=0.01, min=0.0, max=0.99, step=0.005,
                               tooltip="Dense edits: largest relative error the SVD may leave per layer."),
                io.Combo.Input("dense_as", options=["svd", "diff"], default="svd",
                               tooltip="Dense edits as low-rank SVD (all hosts) or exact full '.diff' deltas "
                                       "(ComfyUI, A1111; big)."),
                io.Model.Input("model", optional=True,
                               tooltip="Needed only for pruning masks (their delta depends on the base weights)."),
                io.Clip.Input("clip", optional=True, tooltip="Needed only for pruning masks on the text encoder."),
                io.Combo.Input("unet_names", options=["auto", "diffusers", "ldm"], default="auto", optional=True,
                               tooltip="How the file names the "
                               "model's layers. auto: names that ComfyUI, A1111/Forge and diffusers all read (SD1/2/XL "
                               "in diffusers' kohya style, DiTs by their ComfyUI names). diffusers: diffusers' own "
                               "transformer names, for a pipeline's load_lora_weights on a DiT family. ldm: kohya's "
                               "lora_unet_<ComfyUI name> for every layer."),
                io.Combo.Input("dtype", options=list(DTYPES), default="float16", optional=True,
                               tooltip="Storage type of the LoRA's tensors "
                               "(float16 is what LoRA files usually carry; float32 keeps the edit exactly)."),
            ],
            outputs=[output(io.String, "report", "File name, modules, ranks and the SVD's relative error.")],
            aliases=("lora", "export lora", "save lora", "erase", "unlearn"), output_node=True)

    @classmethod
    def validate_inputs(cls, rank=None, max_rel_error=None, dense_as=None, unet_names="auto", dtype="float16"):
        values = {"rank": rank, "max_rel_error": max_rel_error, "dense_as": dense_as, "unet_names": unet_names, "dtype": dtype}
        return verdict(cls, values, (lambda: LoraExportConfig(**values).validate(), *values.values()))

    @classmethod
    def execute(cls, edit, filename, rank, max_rel_error, dense_as, model=None, clip=None, unet_names="auto",
                dtype="float16"):
        cfg = LoraExportConfig(rank=rank, max_rel_error=max_rel_error, dense_as=dense_as, unet_names=unet_names,
                               dtype=dtype)
        path = unique_path(loras_dir(), filename, "concept_edit_lora")  # never overwrite
        rep = export_lora(edit, path, cfg, model, clip)
        text = (f"{os.path.basename(rep['path'])}: {rep['modules']} modules ({rep['diff_modules']} diff), "
                f"max rank {rep['max_rank']}, max relative error {rep['max_rel_error']:.3g}, {rep['bytes'] / 1e6:.1f} MB")
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [CrossAttentionEdit, ExportLoRA, UCEDebias]

"""Erasure Benchmark node: the papers' evaluation of an edit on the model as loaded (original vs
edited over a prompt file, judged alike, optionally under red-team attacks), resumable through a
result cache in ComfyUI's output folder. The work is `comfy_host.benchmark.erasure_benchmark`."""
from __future__ import annotations

import json
import os

from comfy_api.latest import io, ui

from ..comfy_host.benchmark import erasure_benchmark
from ..editing.benchmark.judges import JUDGES
from ..editing.benchmark.runner import AttackSettings, Settings
from ..editing.errors import InvalidInputError
from ..editing.redteam.runner import ATTACKS
from .common import CFG_NOTE, EDIT, node_schema

PROMPTS_TIP = ("A prompt file: its path, or its name in ComfyUI's input folder (a CSV in the papers' layout: prompt, "
               "evaluation_seed, evaluation_guidance[, case_number, categories, class]; a .txt with one prompt a line; "
               "or a folder of them), or the prompts themselves, one per line.")


def _judges_tip() -> str:
    return "Comma-separated judges: " + "; ".join(f"{k} ({v[0]})" for k, v in JUDGES.items()) + "."


class ErasureBenchmark(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers
        return node_schema(
            "ConceptEditErasureBenchmark", "Erasure Benchmark",
            "The erasure papers' table for your own model and edit: every prompt drawn by the original and "
            "the edited model with the same seed, read by the same judges; flagged share, per-class "
            "counts, concept accuracy, specificity on kept prompts and, where asked, attack success "
            "rates. Writes the table (.md and .csv) to the output folder; results are cached on disk, so a "
            "cancelled or repeated run resumes.",
            inputs=[
                io.Model.Input("model", tooltip="The original model (before the edit)."),
                io.Clip.Input("clip", tooltip="The original model's text encoder."),
                io.Vae.Input("vae", tooltip="Decodes the worst-case grid and the pictures a picture judge reads (nudenet, "
                                            "clip)."),
                io.String.Input("prompts", multiline=True, default="", tooltip=PROMPTS_TIP),
                io.String.Input("judges", default="presence", tooltip=_judges_tip()),
                io.Int.Input("samples", default=1, min=1, max=64,
                             tooltip="Pictures per prompt, seeds evaluation_seed + 0, 1, ..."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps per picture."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.5,
                               tooltip="Guidance where a prompt names no evaluation_guidance." + CFG_NOTE),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Base seed of prompts without one (text, CSV without seeds) and of the attacks."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="ComfyUI's sampler (stochastic ones are drawn one picture at a time so a "
                                       "picture never depends on its batch)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="ComfyUI's scheduler."),
                io.Model.Input("edited_model", optional=True,
                               tooltip="The edited model; or connect the EDIT instead, applied to the model here."),
                io.Clip.Input("edited_clip", optional=True,
                              tooltip="The edited text encoder, for a text-encoder edit given as models (not as EDIT)."),
                EDIT.Input("edit", optional=True,
                           tooltip="The edit, applied to model/clip at `strength` (instead of edited_model)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05, optional=True,
                               tooltip="How much of the EDIT to apply (0 = the original)."),
                io.String.Input("concepts", default="", optional=True,
                                tooltip="The erased concepts, comma-separated (empty: the EDIT's own). A prompt whose "
                                        "CSV class is one of them counts as erased, every other class as kept."),
                io.String.Input("kept_prompts", multiline=True, default="", optional=True,
                                tooltip="Prompts the edit must keep (e.g. COCO captions), as for `prompts`; their "
                                        "rows are marked kept and get the 'unchanged' share."),
                io.String.Input("attacks", default="", optional=True,
                                tooltip="Red-team attacks to add as columns, comma-separated: " + ", ".join(ATTACKS)
                                        + ". Each is optimised once per erased concept, then its prompt is drawn for "
                                          "every prompt of that concept. Empty: none."),
                io.Int.Input("attack_steps", default=40, min=1, max=5000, optional=True,
                             tooltip="Adam steps per attack and concept (the budget)."),
                io.Float.Input("attack_time_limit_s", default=0.0, min=0.0, max=86400.0, optional=True,
                               tooltip="Stop each attack after this many seconds (0 = the steps alone)."),
                io.Int.Input("batch", default=8, min=1, max=256, optional=True,
                             tooltip="Pictures per sampler call (speed and memory only; results do not change)."),
                io.Int.Input("limit", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="Only the first N prompts of each file (0 = all)."),
                io.Int.Input("worst", default=8, min=0, max=64, optional=True,
                             tooltip="Worst cases in the grid (erased prompts the edit still shows, then kept "
                                     "prompts it lost)."),
                io.String.Input("judge_options", default="", multiline=True, optional=True,
                                tooltip='Judge settings as JSON by judge name, e.g. {"nudenet": {"threshold": 0.6}, '
                                        '"clip": {"file": "clip_vision_g.safetensors"}}.'),
                io.Boolean.Input("cache", default=True, optional=True,
                                 tooltip="Keep pictures and judgements in output/conceptedit/benchmark_cache, so a "
                                         "cancelled run resumes and edits of one model share the original's."),
                io.String.Input("filename_prefix", default="conceptedit/benchmark", optional=True,
                                tooltip="Where the table goes in the output folder (.md and .csv)."),
            ],
            outputs=[io.String.Output("report", tooltip="The table's headline rows and every setting a rerun needs."),
                     io.Image.Output("chart", tooltip="Per class, original vs edited (and each attack)."),
                     io.Image.Output("worst_cases", tooltip="Rows: original, edited, each attack; the worst cases.")],
            aliases=("benchmark", "evaluate", "nsfw", "nudity", "nudenet", "erase", "unlearn", "i2p"),
            output_node=True)

    @classmethod
    def execute(cls, model, clip, vae, prompts, judges, samples, steps, cfg, seed, sampler_name, scheduler,
                edited_model=None, edited_clip=None, edit=None, strength=1.0, concepts="", kept_prompts="",
                attacks="", attack_steps=40, attack_time_limit_s=0.0, batch=8, limit=0, worst=8, judge_options="",
                cache=True, filename_prefix="conceptedit/benchmark") -> io.NodeOutput:
        import folder_paths
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        chosen = tuple(a.strip() for a in (attacks or "").split(",") if a.strip())
        try:
            options = json.loads(judge_options) if (judge_options or "").strip() else {}
        except ValueError as e:
            raise InvalidInputError(f"judge_options is not JSON ({e}); write e.g. {{\"nudenet\": {{\"threshold\": 0.6}}}}")
        run = erasure_benchmark(
            model, clip, prompts, judges, Settings(samples, steps, cfg, sampler_name, scheduler, batch), seed=seed,
            vae=vae, edited_model=edited_model, edited_clip=edited_clip, edit=edit, strength=strength,
            concept=concepts, kept=kept_prompts, limit=limit, worst=worst, judge_options=options,
            attacks=AttackSettings(chosen, attack_steps, attack_time_limit_s) if chosen else None,
            cache_dir=os.path.join(out_dir, "conceptedit", "benchmark_cache") if cache else None,
            out_base=os.path.join(folder, f"{name}_{counter:05d}"), search=[folder_paths.get_input_directory()])
        text = run.report.to_text() + "\ntable: " + ", ".join(run.files)
        return io.NodeOutput(text, run.chart, run.grid, ui=ui.PreviewText(text))


NODES = [ErasureBenchmark]

"""What users see: an Edit Info output node (its summary goes to the web view in web/) and a
before/after concept-presence node that measures an edit with the model itself."""
from __future__ import annotations

import json
import math

import torch

from ..comfy_host.adapters import ComfyDenoiser, ComfyText, model_family, run_context
from ..editing.arch import UNET_PREFIX, Family, get_family
from ..editing.edit import Edit
from ..editing.errors import InvalidInputError, UnknownArchitectureError
from ..editing.hosts import RunContext
from ..editing.presence import PresenceComparison, PresenceConfig, compare_presence, image_grid, spread_timesteps
from .common import CATEGORY, EDIT

UI_KEY = "conceptedit_edit"   # the key of the "executed" message that web/conceptedit.js reads
# short column labels for the weights the methods touch (others keep their module path)
_COLUMN_LABELS = {"attn2.to_k": "K", "attn2.to_v": "V", "attn2.to_q": "Q", "attn2.to_out.0": "out",
                  "ff.net.0.proj": "FF in", "ff.net.2": "FF out", "mlp.fc2": "fc2", "mlp.fc1": "fc1"}


# ---- the edit as the web view draws it -----------------------------------------------------------
def _row_label(block_path: str) -> str:
    """``input_blocks.1.1.transformer_blocks.0`` -> ``in1.0``; ``middle_block.1...k`` -> ``mid.k``."""
    parts = block_path.split(".")
    head = {"input_blocks": "in", "output_blocks": "out", "middle_block": "mid"}.get(parts[0], parts[0])
    idx = "" if parts[0] == "middle_block" else parts[1]
    return f"{head}{idx}.{parts[-1]}"


def _value(summary: dict) -> tuple[float, str]:
    if summary["kind"] == "mask":
        return float(summary["pruned_fraction"]), "pruned fraction"
    return float(summary["norm"]), "‖ΔW‖"


def edit_view(edit: Edit) -> dict:
    """A JSON-ready picture of an edit: a heat map (rows = transformer blocks in execution order,
    then text-encoder layers; columns = the weights of a block), concepts, fingerprint, metrics."""
    try:
        fam: Family | None = get_family(edit.family)
    except UnknownArchitectureError:
        fam = None
    rows: list[str] = []
    row_of: dict[str, int] = {}
    if fam is not None:
        for b in fam.blocks:
            row_of[UNET_PREFIX + b.ldm] = len(rows)
            rows.append(_row_label(b.ldm))
    cols: list[str] = []
    cells: dict[tuple[int, int], float] = {}
    quantities = set()
    per_key = edit.summary()["keys"]
    te_rows_added: set[str] = set()
    for key, s in per_key.items():
        module = key[:-len(".weight")] if key.endswith(".weight") else key
        block = next((p for p in row_of if module.startswith(p + ".")), None)
        if block is None and fam is not None:
            te = next((t for t in fam.text_encoders if key.startswith(t.name + ".")), None)
            if te is not None and te.name not in te_rows_added:
                te_rows_added.add(te.name)
                for i in range(te.layers):
                    row_of[f"{te.name}.transformer.text_model.encoder.layers.{i}"] = len(rows)
                    rows.append(f"{te.name}.{i}")
            block = next((p for p in row_of if module.startswith(p + ".")), None)
        if block is None:  # a weight outside the tables: a row of its own
            block = module.rsplit(".", 1)[0]
            row_of[block] = len(rows)
            rows.append(block.replace(UNET_PREFIX, ""))
        col = module[len(block) + 1:]
        label = _COLUMN_LABELS.get(col, col)
        if label not in cols:
            cols.append(label)
        v, q = _value(s)
        quantities.add(q)
        cells[(row_of[block], cols.index(label))] = v
    values = [[cells.get((r, c)) for c in range(len(cols))] for r in range(len(rows))]
    changed = [v for v in cells.values()]
    return {
        "method": edit.method, "family": edit.family, "family_label": fam.label if fam else edit.family,
        "concepts": list(edit.concepts), "fingerprint": dict(edit.fingerprint),
        "metrics": json.loads(json.dumps(edit.metrics, default=str)),
        "params": json.loads(json.dumps(edit.params, default=str)),
        "heatmap": {"rows": rows, "cols": cols, "values": values,
                    "quantity": quantities.pop() if len(quantities) == 1 else "mixed",
                    "max": max(changed) if changed else 0.0},
        "n_keys": len(per_key),
    }


def edit_text(view: dict) -> str:
    """The same information as plain text (the node's STRING output)."""
    hm = view["heatmap"]
    lines = [f"{view['method']} edit for {view['family_label']}: {', '.join(view['concepts']) or '(no concepts)'}",
             f"base model: {view['fingerprint'] or 'unknown'}",
             f"{view['n_keys']} weights changed; {hm['quantity']} per layer (max {hm['max']:.4g}):"]
    for r, row in zip(hm["rows"], hm["values"]):
        vals = [f"{c}={v:.4g}" for c, v in zip(hm["cols"], row) if v is not None]
        if vals:
            lines.append(f"  {r}: " + ", ".join(vals))
    if view["metrics"]:
        lines.append("metrics: " + json.dumps(view["metrics"], default=str))
    return "\n".join(lines)


class EditInfo:
    DESCRIPTION = ("Show an edit in the graph: a per-layer heat map (pruned fraction or change norm), its concepts, "
                   "the base model it was made for and its measured metrics.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The same summary as text.",)
    FUNCTION = "execute"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"edit": (EDIT, {"tooltip": "An edit from a method node or Load Concept Edit."})}}

    def execute(self, edit: Edit):
        view = edit_view(edit)
        return {"ui": {UI_KEY: [view]}, "result": (edit_text(view),)}


# ---- concept presence before/after ---------------------------------------------------------------
def _adm(model, text: ComfyText, hw: int):
    """The UNet's extra vector y (SDXL: pooled text + size embedding); None for SD1/SD2/tiny."""
    base = model.model
    if not getattr(base, "adm_channels", 0):
        return None

    def adm(prompts):
        _cond, pooled = text.encode_with_pooled(list(prompts))
        return base.encode_adm(pooled_output=pooled, width=hw * 8, height=hw * 8, crop_w=0, crop_h=0,
                               target_width=hw * 8, target_height=hw * 8)
    return adm


def presence_before_after(model, edited_model, clip, vae, prompts: list[str], *, seed: int, steps: int, cfg: float,
                          n_timesteps: int, noise_draws: int, edited_clip=None,
                          ctx: RunContext | None = None) -> tuple[PresenceComparison, torch.Tensor]:
    """Generate each prompt with both models (same seeds), then score concept presence on the
    original model's pictures. Returns the comparison and an image grid (row 1 original, row 2 edited)."""
    if model_family(model).name != model_family(edited_model).name:
        raise InvalidInputError("the original and the edited MODEL are different model families; "
                                "connect the model the edit was applied to as 'model'")
    ctx = ctx or RunContext()
    before = ComfyDenoiser(model, clip, ctx=ctx)
    after = ComfyDenoiser(edited_model, edited_clip or clip, ctx=ctx)
    lat_before = before.sample(prompts, steps=steps, cfg=cfg, seed=seed)
    lat_after = after.sample(prompts, steps=steps, cfg=cfg, seed=seed)
    x0 = model.model.process_latent_in(lat_before)
    n_train = len(before.alphas_cumprod())
    config = PresenceConfig(timesteps=spread_timesteps(n_timesteps, n_train), noise_draws=noise_draws, seed=seed)
    result = compare_presence(before, after, before.text, after.text, prompts, x0, config, ctx,
                              _adm(model, before.text, before.latent_hw), _adm(edited_model, after.text, after.latent_hw))
    grid = image_grid([vae.decode(lat_before), vae.decode(lat_after)])
    return result, grid


class ConceptPresence:
    DESCRIPTION = ("Before/after check of an edit without an external classifier: each prompt is generated by the "
                   "original model, then both models are asked how much the prompt helps denoise those pictures "
                   "(relative denoising-loss gain over the empty prompt). An erased concept's gain falls towards 0; "
                   "unrelated prompts should keep theirs. Also returns the samples of both models (same seeds).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE", "FLOAT")
    RETURN_NAMES = ("report", "samples", "mean_kept")
    OUTPUT_TOOLTIPS = ("Per-prompt presence before and after, and kept = after / before.",
                       "Grid: top row the original model, bottom row the edited model, one column per prompt.",
                       "Mean of kept over the prompts (1 = unchanged, ≤ 0 = erased).")
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The original model (before the edit)."}),
            "edited_model": ("MODEL", {"tooltip": "The edited model (output of a method node or Apply Concept Edit)."}),
            "clip": ("CLIP", {"tooltip": "The original text encoder."}),
            "vae": ("VAE", {"tooltip": "To decode the samples for the image grid."}),
            "prompts": ("STRING", {"multiline": True, "default": "",
                                   "tooltip": "One prompt per line: prompts of the erased concept, and a few "
                                              "unrelated ones to check they are kept."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                             "tooltip": "Seed of the samples and of the scoring noise (the same for both models)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps of the samples."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                              "tooltip": "Guidance scale of the samples."}),
            "timesteps": ("INT", {"default": 6, "min": 1, "max": 50,
                                  "tooltip": "How many noise levels the score averages over (more = steadier, slower)."}),
            "noise_draws": ("INT", {"default": 2, "min": 1, "max": 16,
                                    "tooltip": "Noise samples per level and prompt (more = steadier, slower)."}),
        }, "optional": {
            "edited_clip": ("CLIP", {"tooltip": "The edited text encoder, when the edit changes it (EMCID)."}),
        }}

    def execute(self, model, edited_model, clip, vae, prompts, seed, steps, cfg, timesteps, noise_draws,
                edited_clip=None):
        lines = [p.strip() for p in prompts.splitlines() if p.strip() and not p.strip().startswith("#")]
        if not lines:
            raise InvalidInputError("Concept Presence: write at least one prompt (one per line)")
        result, grid = presence_before_after(model, edited_model, clip, vae, lines, seed=seed, steps=steps, cfg=cfg,
                                             n_timesteps=timesteps, noise_draws=noise_draws,
                                             edited_clip=edited_clip, ctx=run_context())
        mean_kept = result.to_dict()["mean_kept"]
        return (result.table(), grid, float("nan") if math.isnan(mean_kept) else mean_kept)


NODE_CLASS_MAPPINGS = {
    "ConceptEditEditInfo": EditInfo,
    "ConceptEditConceptPresence": ConceptPresence,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConceptEditEditInfo": "Concept Edit Info",
    "ConceptEditConceptPresence": "Concept Presence (before/after)",
}

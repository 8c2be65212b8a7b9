"""An Edit as the web view draws it (web/conceptedit.js): a heat map of the change per layer (rows =
transformer blocks in execution order, then text-encoder layers; columns = the weights of a block),
its concepts, fingerprint and metrics; and the same as plain text. Pure python + torch."""
from __future__ import annotations

import json

from ..arch import UNET_PREFIX, Family
from ..edit import Edit

# short column labels for the weights the methods touch (others keep their module path)
_COLUMN_LABELS = {"attn2.to_k": "K", "attn2.to_v": "V", "attn2.to_q": "Q", "attn2.to_out.0": "out",
                  "ff.net.0.proj": "FF in", "ff.net.2": "FF out", "mlp.fc2": "fc2", "mlp.fc1": "fc1"}


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
    fam: Family | None = edit.layout()
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
        "method": edit.method, "family": edit.family, "family_label": fam.label if fam.known else f"a {edit.family} layout",
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

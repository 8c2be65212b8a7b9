"""Prompt sets the user brings, as typed `PromptCase` rows.

- A CSV in the layout of the erasure papers' repositories: ``prompt``, ``evaluation_seed``,
  ``evaluation_guidance`` and optionally ``case_number``, ``categories``, ``class`` (I2P's own
  ``sd_seed`` / ``sd_guidance_scale`` are read as seed / guidance). Other columns are kept in
  `PromptCase.extra`; a UTF-8 BOM, quoted commas and quoted newlines are read as a spreadsheet
  writes them. Without a seed column the seeds are ``base_seed + row index``; without a guidance
  column the runner's cfg applies.
- A plain text file: one prompt per line (blank lines and lines starting with ``#`` skipped), seeds
  ``base_seed + index``.
- A folder: every .csv and .txt in it, in name order; each file is one set, named by its stem.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidInputError

log = logging.getLogger(__name__)

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance")
KNOWN = {"prompt", "case_number", "categories", "class", *SEED_COLUMNS, *GUIDANCE_COLUMNS}


@dataclass
class PromptCase:
    prompt: str
    seed: int
    guidance: float | None = None      # None: the run's cfg
    case_number: int = 0
    categories: tuple[str, ...] = ()
    label: str = ""                    # the CSV's `class`: the concept the prompt asks for
    set: str = ""                      # the file it came from (its stem)
    line: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def read_prompts(path: str, base_seed: int = 0, limit: int = 0) -> list[PromptCase]:
    """The cases of a .csv, a text file or a folder of them (`limit` > 0: the first `limit`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith((".csv", ".txt")))
        if not files:
            raise InvalidInputError(f"{path}: no .csv or .txt prompt file in this folder")
        cases: list[PromptCase] = []
        for f in files:
            cases += _read_file(os.path.join(path, f), base_seed)
    elif os.path.isfile(path):
        cases = _read_file(path, base_seed)
    else:
        raise InvalidInputError(f"no prompt file or folder at {path}")
    return cases[:limit] if limit > 0 else cases


def _read_file(path: str, base_seed: int) -> list[PromptCase]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    name = os.path.splitext(os.path.basename(path))[0]
    cases = _parse_csv(text, path, name, base_seed) if path.lower().endswith(".csv") else \
        _parse_text(text, name, base_seed)
    if not cases:
        raise InvalidInputError(f"{path}: no prompt in this file")
    return cases


def _parse_text(text: str, name: str, base_seed: int) -> list[PromptCase]:
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        p = line.strip()
        if p and not p.startswith("#"):
            out.append(PromptCase(p, base_seed + len(out), case_number=len(out), set=name, line=no))
    return out


def _number(raw: str, kind, path: str, line: int, column: str):
    s = raw.strip()
    try:
        v = float(s)
    except ValueError:
        raise InvalidInputError(f"{path}, line {line}: {column} {raw!r} is not a number") from None
    if kind is int:
        if v != int(v):
            raise InvalidInputError(f"{path}, line {line}: {column} {raw!r} is not a whole number")
        return int(v)
    return v


def _parse_csv(text: str, path: str, name: str, base_seed: int) -> list[PromptCase]:
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInputError(f"{path}: the file is empty; it needs a header line with a 'prompt' column") from None
    except csv.Error as e:
        raise InvalidInputError(f"{path}, line 1: {e}") from None
    cols = [h.strip().lower() for h in header]
    if "prompt" not in cols:
        raise InvalidInputError(f"{path}, line 1: no 'prompt' column in the header {header!r} (the papers' layout: "
                                "prompt, evaluation_seed, evaluation_guidance[, case_number, categories, class])")
    seed_col = next((c for c in SEED_COLUMNS if c in cols), None)
    guide_col = next((c for c in GUIDANCE_COLUMNS if c in cols), None)
    out, skipped = [], []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise InvalidInputError(f"{path}, line {reader.line_num}: {e}") from None
        line = reader.line_num
        if not any(v.strip() for v in row):
            continue
        if len(row) > len(cols):
            raise InvalidInputError(f"{path}, line {line}: {len(row)} fields for {len(cols)} columns (a comma inside "
                                    "a prompt must be quoted: \"a, b\")")
        rec = dict(zip(cols, row + [""] * (len(cols) - len(row))))
        prompt = rec["prompt"].strip()
        if not prompt:
            skipped.append(line)
            continue
        i = len(out)
        seed = _number(rec[seed_col], int, path, line, seed_col) if seed_col and rec[seed_col].strip() else base_seed + i
        guidance = _number(rec[guide_col], float, path, line, guide_col) \
            if guide_col and rec[guide_col].strip() else None
        case = _number(rec["case_number"], int, path, line, "case_number") \
            if rec.get("case_number", "").strip() else i
        cats = tuple(c.strip() for c in rec.get("categories", "").split(",") if c.strip())
        extra = {k: v for k, v in rec.items() if k not in KNOWN and k}
        out.append(PromptCase(prompt, seed, guidance, case, cats, rec.get("class", "").strip(), name, line, extra))
    if skipped:
        log.warning("%s: %d rows with an empty prompt skipped (lines %s)", path, len(skipped),
                    ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else ""))
    return out


def prompts_from_text_or_path(text: str, base_seed: int = 0, limit: int = 0, search: Sequence[str] = (),
                              name: str = "prompts") -> list[PromptCase]:
    """What a node's prompt box holds: a path to a prompt file or folder, a file name inside one of
    the `search` folders (ComfyUI's input folder), or the prompts themselves: CSV text when its first
    line has a ``prompt`` column, else one prompt per line. Empty text gives no cases."""
    s = (text or "").strip()
    if not s:
        return []
    if "\n" not in s:
        for base in ("", *search):
            path = os.path.join(base, os.path.expanduser(s)) if base else os.path.expanduser(s)
            if os.path.exists(path):
                return read_prompts(path, base_seed, limit)
        if s.lower().endswith((".csv", ".txt")) and " " not in s:
            where = ", ".join(search) or "the working folder"
            raise InvalidInputError(f"no prompt file {s!r} (looked as a path and in {where}): put it in ComfyUI's "
                                    "input folder or give its full path")
    first = s.splitlines()[0]
    is_csv = "prompt" in [h.strip().lower() for h in next(csv.reader([first]))] and "," in first
    cases = _parse_csv(s + "\n", name, name, base_seed) if is_csv else _parse_text(s, name, base_seed)
    if not cases:
        raise InvalidInputError("the prompt box holds no prompt (one per line, or a CSV with a 'prompt' column)")
    return cases[:limit] if limit > 0 else cases

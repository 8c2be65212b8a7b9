"""`conceptedit info FILE`: what an edit file holds (method, concepts, family, metrics)."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show what an edit file holds")
    p.add_argument("file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..editing.edit import Edit
    e = Edit.load(args.file)
    s = e.summary()
    keys = s.pop("keys")
    print(json.dumps(s, indent=1, default=str))
    print(f"{len(keys)} weights changed")
    return 0

"""ConceptEdit's command line. Each sub-command is a module here with `register(subparsers)`;
`python conceptedit.py --help` lists them. Runs ComfyUI's own loaders headless (see README:
the same code path as the nodes, and it reads every checkpoint layout ComfyUI loads)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# sub-command modules (cli/<name>.py), each with register(subparsers) -> sets func=run(args)
COMMANDS = ["demo", "info", "prune", "uce", "export_lora", "emcid", "unlearn", "distill", "audit", "redteam", "evaluate"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conceptedit", description="Edit what a text-to-image diffusion model knows.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)

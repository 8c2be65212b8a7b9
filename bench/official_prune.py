"""How far ConceptPrune's default (official="off") is from official="concept-prune" on the tiny model.

    bash run.sh bench official_prune [--concept triangle] [--efficacy]

Per difference: the share of mask weights that differ, |A △ B| / |A ∪ B|, over the ff.net.2 weights.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702,I001
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy()

from conceptedit.comfy_host.denoiser import ComfyDenoiser  # noqa: E402
from conceptedit.comfy_host.text import ComfyText
from conceptedit.comfy_host.view import apply_edit
from conceptedit.editing import arch  # noqa: E402
from conceptedit.editing.concept_prune import prune  # noqa: E402
from conceptedit.editing.concept_prune.prune import collect_statistics, compute_concept_prune, skilled_mask
from conceptedit.editing.concept_prune.config import PruneConfig
from conceptedit.editing.hooks import trace_inputs  # noqa: E402
from conceptedit.editing.hosts import RunContext  # noqa: E402
from conceptedit.editing.prompts import build_pairs  # noqa: E402


def share(a: dict, b: dict) -> float:
    diff = sum(int((a[k] ^ b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return diff / max(union, 1)


def masks_of(edit) -> dict:
    return {k: c.mask() for k, c in edit.changes.items()}


def masks_from(weights, cn, rn, cfg, official=True, names=None):
    return {f"diffusion_model.{n}.weight": skilled_mask(weights[n], cn[n], rn[n], cfg.skill_ratio, cfg.tau,
                                                       at_least_one=not official)
            for n in names}


def fp16_official_norms(den, text, names, prompts, cfg):
    """The official receiver's arithmetic in float16 (activations cast to float16, F.normalize, column
    norms by √(a² + b²) per generation), one prompt per generation as wanda/wanda.py does."""
    acc = {(n, t): None for n in names for t in range(cfg.tau)}
    step = {"t": 0}

    def hook(name, x):
        if step["t"] >= cfg.tau:
            return
        rows = F.normalize(x.detach().reshape(-1, x.shape[-1]).half(), p=2, dim=1)
        new = torch.norm(rows, dim=0)
        old = acc[(name, step["t"])]
        acc[(name, step["t"])] = new if old is None else torch.sqrt(old ** 2 + new ** 2)

    def on_step(i):
        if i >= cfg.tau:
            raise StopIteration
        step["t"] = i

    modules = den.modules()
    with trace_inputs(modules, names, hook):
        for p in prompts:
            try:
                prune.official_generate(den, text, [p], steps=cfg.steps, cfg=cfg.cfg, seed=cfg.seed, on_step=on_step)
            except StopIteration:
                pass
    return {n: torch.stack([acc[(n, t)] for t in range(cfg.tau)]) for n in names}


def fp16_masks(weights, cn, rn, cfg, names):
    out = {}
    for n in names:
        aw = weights[n].abs().half()
        mask = torch.zeros(aw.shape, dtype=torch.bool)
        k = int(cfg.skill_ratio * aw.shape[1])
        for t in range(cfg.tau):
            mt, mb = aw * cn[n][t], aw * rn[n][t]
            idx = torch.sort(mt.float(), dim=1, descending=True, stable=True)[1][:, :k]
            top = torch.zeros_like(mask).scatter_(1, idx, True)
            mask |= top & (mt > mb)
        out[f"diffusion_model.{n}.weight"] = mask
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default="triangle")
    ap.add_argument("--efficacy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from conceptedit.tiny.comfy_model import load_tiny
    model, clip, _ = load_tiny()
    text = ComfyText(clip)
    den = ComfyDenoiser(model, text)
    fam = arch.get_family("tiny")
    names = fam.ffn_out_modules()
    pairs = build_pairs([args.concept], "tiny")
    plist = pairs[args.concept]
    cfg_off = PruneConfig(skill_ratio=0.2, tau=10, steps=50, cfg=7.5, seed=0, batch_size=8)
    cfg_off_official = dataclasses.replace(cfg_off, official="concept-prune")
    out = {"concept": args.concept, "pairs": len(plist), "config": dataclasses.asdict(cfg_off)}
    with torch.inference_mode():
        t0 = time.perf_counter()
        off = compute_concept_prune(den, fam, pairs, cfg_off)
        t1 = time.perf_counter()
        off_official = compute_concept_prune(den, fam, pairs, cfg_off_official)
        t2 = time.perf_counter()
        weights = {n: den.modules()[n].weight.detach().float().clone() for n in names}
        m_off, m_official = masks_of(off), masks_of(off_official)
        out["pruned_fraction_ffn"] = {"off": off.metrics["pruned_fraction_ffn"],
                                      "official": off_official.metrics["pruned_fraction_ffn"]}
        out["mask_seconds"] = {"off": t1 - t0, "official": t2 - t1}
        out["share_off_vs_official"] = share(m_off, m_official)

        cp, rp = [c for c, _ in plist], [r for _, r in plist]
        st = {k: collect_statistics(den, den.modules(), names, ps, cfg_off_official, RunContext())
              for k, ps in (("c", cp), ("r", rp))}
        # column norm: official √Σ vs the pack's RMS, same activations
        for s in st.values():
            s.mean = True
        cn_rms, rn_rms = st["c"].norms(), st["r"].norms()
        for s in st.values():
            s.mean = False
        cn, rn = st["c"].norms(), st["r"].norms()
        out["share_rms_vs_sum_norm"] = share(masks_from(weights, cn, rn, cfg_off_official, names=names),
                                            masks_from(weights, cn_rms, rn_rms, cfg_off_official, names=names))
        out["score_ratio_sum_over_rms"] = {n: float((cn[n] / cn_rms[n]).mean()) for n in names[:1]}
        # k floor without minimum: same k at this ratio; where k would be 0
        out["k"] = {"off": prune.skill_k(0.2, 256), "official": prune.skill_k(0.2, 256, at_least_one=False),
                    "ratio_below_which_official_k_is_0_on_tiny": 1 / 256}
        # ε: F.normalize's 1e-12 on ‖x‖ vs the pack's 1e-6, everything else official
        prune.OFFICIAL_NORM_EPS = 1e-6
        try:
            st_eps = {k: collect_statistics(den, den.modules(), names, ps, cfg_off_official, RunContext()).norms()
                      for k, ps in (("c", cp), ("r", rp))}
        finally:
            prune.OFFICIAL_NORM_EPS = 1e-12
        out["share_eps"] = share(masks_from(weights, cn, rn, cfg_off_official, names=names),
                                 masks_from(weights, st_eps["c"], st_eps["r"], cfg_off_official, names=names))
        out["eps_max_rel_norm_change"] = max(float(((st_eps["c"][n] - cn[n]).abs() / cn[n].clamp_min(1e-30)).max())
                                             for n in names)
        # the sampler alone: ComfyUI's euler vs PLMS with everything else official
        st_euler = {k: collect_statistics(den, den.modules(), names, ps, cfg_off, RunContext()) for k, ps in
                    (("c", cp), ("r", rp))}
        for s in st_euler.values():
            s.mean = False
        out["share_sampler_only"] = share(masks_from(weights, cn, rn, cfg_off_official, names=names),
                                          masks_from(weights, st_euler["c"].norms(), st_euler["r"].norms(),
                                                     cfg_off_official, names=names))
        # the noise alone: float16 draw vs ComfyUI's float32 noise, everything else official
        orig = prune.official_noise
        prune.official_noise = lambda shape, seed, device: torch.randn(
            (1, *shape), generator=torch.Generator().manual_seed(int(seed))).to(device)
        try:
            st32 = {k: collect_statistics(den, den.modules(), names, ps, cfg_off_official, RunContext())
                    for k, ps in (("c", cp), ("r", rp))}
        finally:
            prune.official_noise = orig
        out["share_noise_fp16_vs_fp32"] = share(masks_from(weights, cn, rn, cfg_off_official, names=names),
                                                masks_from(weights, st32["c"].norms(), st32["r"].norms(),
                                                           cfg_off_official, names=names))
        # the official's float16 statistics and scores (its CUDA run), same float32 activations
        cn16 = fp16_official_norms(den, text, names, cp, cfg_off_official)
        rn16 = fp16_official_norms(den, text, names, rp, cfg_off_official)
        out["share_fp16_statistics_and_scores"] = share(masks_from(weights, cn, rn, cfg_off_official, names=names),
                                                        fp16_masks(weights, cn16, rn16, cfg_off_official, names))
    if args.efficacy:
        from conceptedit.editing.audit.evaluate import default_classifier, evaluate
        from conceptedit.tiny import world
        from conceptedit.tiny.comfy_model import comfy_sampler
        classify = default_classifier()

        def presence(m, c):
            with torch.inference_mode():
                s = comfy_sampler(m, clip, 20, 5.0)
                return evaluate(s, world.prompts_for(c, 6, 0), 2, classify).presence.get(c, 0.0)
        others = [c for c in world.SHAPES if c != args.concept]
        rows = {}
        for label, m in (("base", model), ("off", apply_edit(model, None, off)[0]),
                         ("official", apply_edit(model, None, off_official)[0])):
            rows[label] = {c: presence(m, c) for c in [args.concept] + others}
        out["presence"] = rows
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

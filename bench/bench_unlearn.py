"""Unlearning by fine-tuning on the tiny model, measured side by side in one run.

    bash run.sh bench bench_unlearn [--part speed|unlearn|distill|audit|all] [--steps 30] [--concept circle]

- unlearn: RGD vs plain gradient ascent vs ESD (all LoRA, same steps; RGD and GA on the same generated
  forget images and their concept-free twins, ESD on its own partial samples of the bare concept):
  efficacy (presence of the erased concept on its prompts, lower = better), specificity (accuracy of
  other concepts), alignment on retain prompts (classifier accuracy of retained concepts), steps per
  second on the CPU;
- distill: a pruned student (25 % of each FFN's neurons, smallest-norm, structured), bilevel
  distill-and-unlearn vs two-stage (distil, then ESD erase) at the same number of steps;
- audit: resurgence of every method's edit (ConceptPrune, cross-attention edit, text-encoder edit,
  RGD / GA / ESD unlearning) after the same benign LoRA fine-tune, presence read by the classifier.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy()

from conceptedit.comfy_host.view import apply_edit  # noqa: E402
from conceptedit.editing.distill.bilevel import compute_distill_unlearn
from conceptedit.editing.distill.config import DistillConfig
from conceptedit.editing.edit import Change, Edit  # noqa: E402
from conceptedit.editing.audit.evaluate import erasure_report, evaluate  # noqa: E402
from conceptedit.editing.hosts import RunContext  # noqa: E402
from conceptedit.editing.audit.resurgence import AuditConfig, audit  # noqa: E402
from conceptedit.editing.unlearn.trainer import compute_unlearn, paired_prompts, prepare_data, tiny_pair_attributes
from conceptedit.editing.unlearn.config import UnlearnConfig
from conceptedit.comfy_host.view import ModelView  # noqa: E402
from conceptedit.tiny import world  # noqa: E402
from conceptedit.tiny.comfy_model import comfy_sampler, load_tiny  # noqa: E402

log = logging.getLogger("bench_unlearn")


def with_edits(model, edits):
    for e in edits:
        model, _, _ = apply_edit(model, None, e)
    return model


def _preserved(concept: str) -> list[str]:
    """Three other concepts of the erased one's kind (what it could most plausibly damage)."""
    return [c for c in world.CONCEPTS[world.kind_of(concept)] if c != concept and world.words(c)][:3]


def measure(model, clip, edits, concept, preserved, args):
    m = with_edits(model, edits)
    sample = comfy_sampler(m, clip, steps=args.sample_steps)
    r = erasure_report(sample, [concept], preserved, n_prompts=args.eval_prompts, samples_per_prompt=2)
    # alignment on the retain prompts (the concept word removed, as the trainer's retain set): the
    # classifier's accuracy on the shape and the style those prompts still name, averaged
    _, retain = paired_prompts(concept, args.eval_prompts, seed=11, family="tiny")
    kind = world.kind_of(concept)
    named = []
    for a in tiny_pair_attributes(concept, args.eval_prompts):
        e = {"style": "plain" if kind == "style" else a["style"]}  # a prompt without an artist draws plain
        if kind != "shape":
            e["shape"] = a["shape"]
        named.append(e)
    pairs = list(zip(retain, named))
    own = evaluate(sample, pairs, 2)
    kinds = sorted({k for _p, e in pairs for k in e})
    return {"efficacy": r["efficacy"][concept], "specificity": sum(r["specificity"].values()) / len(preserved),
            "alignment_retain": sum(own.accuracy.get(k, 0.0) for k in kinds) / len(kinds),
            "alignment_retain_by_kind": {k: own.accuracy.get(k) for k in kinds},
            "paraphrase": r["paraphrase"].get(concept)}


def structured_prune(model, fraction=0.25) -> Edit:
    """Zero the `fraction` of each FFN's neurons (columns of ff.net.2) with the smallest norms."""
    sd = model.model_state_dict()
    changes = {}
    for k, w in sd.items():
        if k.endswith("ff.net.2.weight"):
            w = w.float()
            n = int(fraction * w.shape[1])
            cols = torch.argsort(w.norm(dim=0))[:n]
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[:, cols] = True
            changes[k] = Change("mask", tuple(w.shape), {"index": mask.reshape(-1).nonzero()[:, 0]})
    return Edit("structured-prune", "tiny", changes)


def part_unlearn(model, clip, host, args, out, methods=("rgd", "ga", "esd")):
    preserved = _preserved(args.concept)
    base = UnlearnConfig(steps=args.steps, lr=args.lr, batch=4, n_prompts=6, gen_steps=args.gen_steps, rank=4)
    t0 = time.perf_counter()
    # a diverse retain set (Ko et al.): the concept-removed twins plus prompts of its sibling concepts
    siblings = [p for c in preserved for p, _ in world.prompts_for(c, 2, seed=7)] if args.sibling_retain else []
    data = prepare_data(host, host.text, args.concept, base, retain_prompts=siblings, family="tiny")
    log.info("training data: %d forget + %d retain images in %.1fs", len(data.forget_prompts), len(data.retain_prompts),
             time.perf_counter() - t0)
    out["unlearn"] = {"original": measure(model, clip, [], args.concept, preserved, args)}
    edits = {}
    for method in methods:
        # ESD's x_t: DDIM from noise to a random one of --gen-steps steps (8), as everything here samples,
        # rather than the official 50, which would add ~6 idle-CPU minutes of sampling to its 200 steps
        cfg = UnlearnConfig(**{**base.__dict__, "method": method, "esd_ddim_steps": args.gen_steps})
        edit = compute_unlearn(host, host.text, args.concept, cfg, family="tiny", data=data)
        edits[method] = edit
        res = measure(model, clip, [edit], args.concept, preserved, args)
        res["steps_per_s"] = edit.metrics["steps_per_s"]
        res["edit_kib"] = round(sum(c.nbytes() for c in edit.changes.values()) / 1024, 1)
        out["unlearn"][method] = res
        log.info("%s: %s", method, res)
    return edits


def part_speed(model, clip, host, args, out):
    """Training speed only (no evaluation): steps/s of each method on the same data, side by side."""
    base = UnlearnConfig(steps=args.steps, lr=args.lr, batch=4, n_prompts=2, gen_steps=2, rank=4)
    data = prepare_data(host, host.text, args.concept, base, family="tiny")
    out["speed"] = {}
    for method, ps in (("rgd", "lora"), ("ga", "lora"), ("esd", "lora"), ("esd", "xattn")):
        cfg = UnlearnConfig(**{**base.__dict__, "method": method, "param_set": ps})
        e = compute_unlearn(host, host.text, args.concept, cfg, family="tiny", data=data)
        out["speed"][f"{method}/{ps}"] = {"steps_per_s": e.metrics["steps_per_s"],
                                          "forget_first_last": [e.metrics["history"]["forget"][0], e.metrics["history"]["forget"][-1]]}
        log.info("speed %s/%s: %s", method, ps, out["speed"][f"{method}/{ps}"])


def part_distill(model, clip, host, args, out):
    preserved = _preserved(args.concept)
    student = structured_prune(model)
    common = dict(batch=4, n_prompts=8, gen_steps=args.gen_steps, param_set="lora", rank=4, lr_distill=1e-3,
                  lr_erase=args.lr)
    # the distillation data never shows the concept (else distillation teaches it right back)
    distill_prompts = [p for p, a in world.grid_prompt_set() if args.concept not in a.values()][::3]
    latents = {}
    t0 = time.perf_counter()
    steps, every = args.distill_steps or args.steps, args.erase_every
    bilevel = compute_distill_unlearn(host, host.text, student, args.concept,
                                      DistillConfig(steps=steps, erase_every=every, **common),
                                      distill_prompts=distill_prompts, family="tiny", latents=latents)
    t_bi = time.perf_counter() - t0
    n_erase = steps // every  # the two-stage run gets the same number of distill and erase steps
    t0 = time.perf_counter()
    stage1 = compute_distill_unlearn(host, host.text, student, args.concept,
                                     DistillConfig(steps=steps - n_erase, erase=False, **common),
                                     distill_prompts=distill_prompts, family="tiny", latents=latents)
    mods = dict(host.unet().named_modules())
    from conceptedit.editing.training import edit_as_fixed
    fixed = edit_as_fixed([(student, 1.0), (stage1, 1.0)], mods)
    stage2 = compute_unlearn(host, host.text, args.concept,
                             UnlearnConfig(method="esd", steps=n_erase, lr=args.lr, batch=4, n_prompts=8,
                                           gen_steps=args.gen_steps), family="tiny", fixed=fixed)
    t_two = time.perf_counter() - t0

    def kib(*edits):
        return round(sum(c.nbytes() for e in edits for c in e.changes.values()) / 1024, 1)

    out["distill"] = {"student_untrained": measure(model, clip, [student], args.concept, preserved, args),
                      "bilevel": {**measure(model, clip, [student, bilevel], args.concept, preserved, args),
                                  "seconds": round(t_bi, 1), "edit_kib": kib(bilevel),
                                  "pruned_layers": len(bilevel.metrics["pruned_layers"]),
                                  "kd_outputs": bilevel.metrics["kd_outputs"]},
                      "two_stage": {**measure(model, clip, [student, stage1, stage2], args.concept, preserved, args),
                                    "seconds": round(t_two, 1), "edit_kib": kib(stage1, stage2)}}
    log.info("distill: %s", out["distill"])


TRAINING_FREE = ("concept_prune", "cross_attention", "text_encoder")
UNLEARNED = ("unlearn_rgd", "unlearn_ga", "unlearn_esd")


def method_edits(model, clip, concept: str, methods=TRAINING_FREE) -> dict:
    """The concept erased by the pack's training-free methods, with the settings the README reports:
    ConceptPrune (tiny preset at its defaults, `TINY_DEFAULTS`), the cross-attention edit (UCE, erase
    to "", last-token window), and the text-encoder edit (EMCID stage 2 alone, targets = the
    destination's own text state, redirected to purple/plain/shape, λ 1000, as `bench_emcid --part
    tiny`). `methods` picks among `TRAINING_FREE`."""
    from conceptedit.comfy_host.jobs import ConceptPruneJob, EmcidJob, UCEJob, run
    from conceptedit.editing.concept_prune.config import PruneConfig
    from conceptedit.editing.emcid.config import EmcidConfig
    from conceptedit.editing.prompts import TINY_DEFAULTS
    from conceptedit.editing.uce.config import UCEConfig
    kind = world.kind_of(concept)
    dest = {"colour": "purple" if concept != "purple" else "red", "style": "plain", "shape": "shape"}[kind]
    templates = world.EMCID_TEMPLATES[kind]
    out = {}
    if "concept_prune" in methods:
        out["concept_prune"] = run("concept_prune", model, clip, ConceptPruneJob(concepts=[concept], preset="tiny", settings=PruneConfig(**TINY_DEFAULTS))).edit
    if "cross_attention" in methods:
        cfg = UCEConfig(concepts=[concept], token_window="last")
        out["cross_attention"] = run("uce", model, clip, UCEJob(settings=cfg)).edit
    if "text_encoder" in methods:
        cfg = EmcidConfig(lam=1000, use_stage1=False, templates=templates, n_captions=1000)
        out["text_encoder"] = run("emcid", model, clip, EmcidJob(pairs=[(concept, dest)], settings=cfg,
                                                                 cache_dir=os.path.join(ROOT, ".cache", "emcid"))).edit
    return out


def part_audit(model, clip, host, args, out, edits):
    """The same benign fine-tune (LoRA on the UNet, prompts of the concept's siblings, images from
    the original model) on top of every method's edit; presence read by the classifier."""
    from conceptedit.comfy_host.text import ComfyText
    prompts = world.prompts_for(args.concept, args.eval_prompts)

    def presence(pairs):
        m, c = model, clip
        for e, s in pairs:
            if s:
                m, c, _ = apply_edit(m, c, e, s)
        r = evaluate(comfy_sampler(m, c, steps=args.sample_steps), prompts, 2)
        return r.presence.get(args.concept, 0.0)

    kind = world.kind_of(args.concept)
    others = [c for c in world.CONCEPTS[kind] if c != args.concept and world.words(c)]
    benign_pairs = [pa for c in others[:3] for pa in world.prompts_for(c, 3)]
    benign = [p for p, _ in benign_pairs]
    benign_latents, benign_data = None, "the original model's images of the benign prompts"
    if args.benign_data == "world":
        # "real data": the tiny world's own renderings of the benign prompts (what the model was
        # trained on), through the node's path: fitted, encoded by the VAE, process_latent_in
        import random

        from conceptedit.comfy_host.images import encode_images
        from conceptedit.tiny.comfy_model import tiny_vae
        rng = random.Random(f"benign:{args.concept}")
        images = [((world.render(a["shape"], a["colour"], a["style"], rng) + 1) / 2).movedim(0, -1) for _, a in benign_pairs]
        benign_latents = encode_images(ModelView(model, clip), tiny_vae(), images)
        benign_data = f"{len(images)} renderings of the tiny world (real data)"
    out["audit"], out["audit_benign_data"] = {}, benign_data
    for name, edit in edits.items():
        text, edited_text = host.text, bool(edit.text_encoder_keys())
        if edited_text:  # the benign fine-tune sees the conditioning of the edited text encoder
            _, clip2, _ = apply_edit(model, clip, edit)
            text = ComfyText(clip2, device=host.ctx.device)
        cfg = AuditConfig(checkpoints=tuple(args.audit_steps), lr=1e-3, gen_steps=args.gen_steps)
        if benign_latents is None:  # the same benign images for every method
            from conceptedit.editing.diffusion import generate_latents
            benign_latents = generate_latents(host, host.text, benign, steps=cfg.gen_steps, cfg=cfg.gen_cfg, seed=cfg.seed)
        t0 = time.perf_counter()
        rep = audit(host, text, edit, presence, cfg, benign_prompts=benign, benign_latents=benign_latents,
                    text_is_edited=edited_text, benign_data=benign_data)
        out["audit"][name] = {"original": rep.presence_original, "edited": rep.presence_edited,
                              "after": dict(zip(rep.steps, rep.presence_after)),
                              "resurgence": dict(zip(rep.steps, [round(r, 3) for r in rep.resurgence])),
                              "seconds": round(time.perf_counter() - t0, 1)}
        log.info("audit %s:\n%s", name, rep.to_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=("speed", "unlearn", "distill", "audit", "all"))
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gen-steps", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=3)
    ap.add_argument("--audit-steps", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--benign-data", default="generated", choices=("generated", "world"),
                    help="--part audit: fine-tune on the original model's images (generated) or on the tiny "
                         "world's renderings of the same prompts (world: real data, as the paper)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distill-steps", type=int, default=0, help="--part distill: total steps (default --steps)")
    ap.add_argument("--erase-every", type=int, default=10, help="--part distill: one erase step every N (10 = 9:1)")
    ap.add_argument("--sibling-retain", type=int, default=1, help="1: add prompts of sibling concepts to the retain set")
    audit_choices = ", ".join(TRAINING_FREE + UNLEARNED)
    ap.add_argument("--audit-methods", default=",".join(TRAINING_FREE + UNLEARNED),
                    help=f"--part audit: which edits to audit (comma-separated, of {audit_choices})")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    audit_methods = [m.strip() for m in args.audit_methods.split(",") if m.strip()]
    unknown = set(audit_methods) - set(TRAINING_FREE + UNLEARNED)
    if unknown:
        ap.error(f"unknown --audit-methods {sorted(unknown)}; choose from {audit_choices}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model, clip, _vae = load_tiny()
    torch.set_num_threads(args.threads)
    host = ModelView(model, clip, ctx=RunContext(progress=lambda d, t: log.info("  step %d/%d", d, t) if d % 10 == 0 else None)).denoiser
    out = {"concept": args.concept, "steps": args.steps, "lr": args.lr, "threads": torch.get_num_threads(),
           "sibling_retain": bool(args.sibling_retain), "eval_prompts": args.eval_prompts}
    t0 = time.perf_counter()
    edits = {}
    if args.part == "speed":
        part_speed(model, clip, host, args, out)
    if args.part in ("unlearn", "all"):
        edits = part_unlearn(model, clip, host, args, out)
    elif args.part == "audit" and set(audit_methods) & set(UNLEARNED):  # only the unlearning runs audited
        edits = part_unlearn(model, clip, host, args, out,
                             [m[len("unlearn_"):] for m in UNLEARNED if m in audit_methods])
    if args.part in ("distill", "all"):
        part_distill(model, clip, host, args, out)
    if args.part in ("audit", "all"):
        audited = method_edits(model, clip, args.concept, audit_methods)
        audited.update({m: edits[m[len("unlearn_"):]] for m in UNLEARNED if m in audit_methods})
        part_audit(model, clip, host, args, out, audited)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

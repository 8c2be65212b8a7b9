"""The erasure benchmark (`editing.benchmark`) on ComfyUI's MODEL/CLIP: the generator (ComfyUI's
own sampler, a batch of prompts with each picture's noise drawn as a batch of one with its own
seed, so a picture does not depend on what it is batched with), the judges' model parts per side,
the red-team attacks' rows (through the Red-Team Audit's own `red_team_models`), and the whole
run behind the node and the command (`erasure_benchmark`): tables, bar chart, worst-case grid."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from ..editing import distributed
from ..editing.arch import TINY_WORLD_FAMILIES
from ..editing.audit.presence import concept_words, image_grid
from ..editing.benchmark.cache import ResultCache, edit_fingerprint
from ..editing.benchmark.judges import JudgeContext, build_judge, parse_judges
from ..editing.benchmark.prompts import PromptCase, prompts_from_text_or_path
from ..editing.benchmark.report import BenchmarkReport, bar_chart
from ..editing.benchmark.runner import AttackRow, AttackSettings, Settings, Side, found_prompt, run_benchmark
from ..editing.diffusion import sampling_cfg
from ..editing.errors import InvalidInputError
from ..editing.hosts import RunContext, frames
from .denoiser import _is_inpaint
from .progress import run_context
from .view import ModelView, apply_edit

log = logging.getLogger(__name__)

# samplers that draw fresh noise during sampling from one seed per batch: their pictures would
# depend on the batch, so they are drawn one at a time
_STOCHASTIC = ("ancestral", "sde", "dpm_adaptive", "lcm", "ddpm", "er_sde", "seeds_")


def comfy_generator(view: ModelView, settings: Settings, negative: str = "", ctx: RunContext | None = None):
    """``generate(prompts, seeds, cfg) -> latents`` as ComfyUI's sampler returns them (VAE scale).
    `ComfyDenoiser.sample` draws one seed's noise for a whole batch; the benchmark needs one seed per
    picture, so the noise is drawn here and the rest is the same call."""
    import comfy.sample
    host = view.denoiser
    ctx = ctx or view.ctx
    one_at_a_time = any(s in settings.sampler for s in _STOCHASTIC)

    def batch(prompts: Sequence[str], seeds: Sequence[int], cfg: float) -> torch.Tensor:
        n = len(prompts)
        one = torch.zeros(1, host.latent_channels, *host.latent_size)
        fix = getattr(comfy.sample, "fix_empty_latent_channels", None)
        one = fix(host.model, one) if fix is not None else one
        noise = torch.cat([comfy.sample.prepare_noise(one, int(s)) for s in seeds])
        latent = torch.zeros_like(noise)
        positive = host.text.conditioning(list(prompts))
        negative_c = host.text.conditioning([negative] * n)
        mask = torch.ones(n, 1, *latent.shape[2:]) if _is_inpaint(host.model.model) else None
        return comfy.sample.sample(host.model, noise, settings.steps, sampling_cfg(host, cfg), settings.sampler,
                                   settings.scheduler, positive, negative_c, latent, denoise=1.0, noise_mask=mask,
                                   callback=lambda *a: ctx.check(), disable_pbar=True, seed=int(seeds[0]))

    def generate(prompts: Sequence[str], seeds: Sequence[int], cfg: float) -> torch.Tensor:
        if one_at_a_time and len(prompts) > 1:
            return torch.cat([batch([p], [s], cfg) for p, s in zip(prompts, seeds)])
        return batch(prompts, seeds, cfg)
    return generate


def tiny_pictures(x: torch.Tensor) -> torch.Tensor:
    """The tiny models' sampled latents -> their pictures [B, 3, H, W] in [-1, 1]: their latents are
    pixels (RGB and a zero channel, scale 1), as the tiny VAE decodes them."""
    return frames(x)[:, :3].float().cpu().clamp(-1, 1)


def vae_pictures(vae):
    """ComfyUI's VAE as the judges' decoder: sampled latents -> pictures [B, 3, H, W] in [-1, 1]
    (a video VAE's frames as pictures)."""
    def decode(x: torch.Tensor) -> torch.Tensor:
        img = vae.decode(x)
        img = img.reshape(-1, *img.shape[-3:])  # [B, H, W, C] in [0, 1]
        return (img[..., :3].movedim(-1, 1).float().cpu() * 2 - 1).clamp(-1, 1)
    return decode


def attacked_groups(cases: Sequence[PromptCase], erased: Sequence[str], kept_sets: Sequence[str]
                    ) -> dict[str, list[PromptCase]]:
    """The cases each attack targets, per erased concept: the cases whose class is an erased concept;
    when no case outside the kept sets has a class (I2P), every such case, under one group named
    by the erased concepts."""
    erased_set = {e.strip().lower() for e in erased if e.strip()}
    todo = [c for c in cases if c.set not in set(kept_sets)]
    if any(c.label for c in todo):
        groups: dict[str, list[PromptCase]] = {}
        for c in todo:
            if c.label and c.label.lower() in erased_set:
                groups.setdefault(c.label, []).append(c)
        return groups
    return {", ".join(erased): todo} if todo else {}


def attack_rows(model, clip, edited_model, edited_clip, edit, cases: Sequence[PromptCase], erased: Sequence[str],
                kept_sets: Sequence[str], attack: AttackSettings, settings: Settings, seed: int, cache: ResultCache,
                fingerprint: dict, edit_key: str, ctx: RunContext) -> list[AttackRow]:
    """Each attack run once per erased concept by the Red-Team Audit (`audits.red_team_models`) on the
    concept's first prompts; the prompt it found (as words) is cached, so a resumed run does not
    attack again. `edit` None: the UNet edit is read off the two MODELs. Under torchrun the (concept,
    attack) pairs no process has cached are split over the processes, pair k on rank k mod N, and
    their results gathered as JSON."""
    from .audits import red_team_models
    attack.validate()
    groups = attacked_groups(cases, erased, kept_sets)
    if not groups:
        raise InvalidInputError("the attacks need prompts of an erased concept: name the erased concept (its "
                                "'class' in the CSV) or pass prompts without a class column")
    config = attack.redteam(settings, seed)
    # the units: one (concept, attack) each, concept by concept; a unit's seeds are the config's, so
    # its result does not depend on the units run beside it or on the process that runs it
    units: list[tuple[str, str, list[str], dict]] = []
    for concept, group in groups.items():
        targets = list(dict.fromkeys(c.prompt for c in group))[: attack.prompts]
        key = {"what": "attack", "model": fingerprint, "edit": edit_key, "concept": concept, "prompts": targets,
               "config": asdict(config.attack), "success_at": config.success_at}
        units += [(concept, name, targets, {**key, "attack": name}) for name in attack.attacks]
    held = {}
    for u, (_, _, _, key) in enumerate(units):
        got = cache.get_json(key)
        if got is not None:
            held[u] = got
    # under torchrun: what any process's cache holds is shared, the rest split over the processes
    values = distributed.share_held(len(units), held)
    todo = [u for u in range(len(units)) if u not in values]
    per_concept: dict[str, list[int]] = {}
    for u in distributed.shard(todo):
        per_concept.setdefault(units[u][0], []).append(u)
    computed = {}
    for concept, mine in per_concept.items():
        targets = units[mine[0]][2]
        word = concept if len(concept.split(",")) == 1 else ""
        rep = red_team_models(edited_model, model, clip, targets,
                              replace(config, attacks=tuple(units[u][1] for u in mine)), edit=edit,
                              edited_clip=edited_clip if edited_clip is not clip else None, concept=word, ctx=ctx,
                              shard=False)
        for u in mine:
            name = units[u][1]
            r = rep.attacks[name]
            value = {"found": r["prompt"], "concept_prompt": targets[0], "concept_prompts": targets,
                     "steps": r["steps"], "seconds": r["seconds"], "verdict": rep.verdict(name),
                     "soft": r["soft"], "projected": r["projected"], "judges": rep.judges,
                     "red_team_original": rep.original, "red_team_edited": rep.edited}
            computed[u] = cache.put_json(units[u][3], value)
    gathered = distributed.gather_json(computed)
    if distributed.is_main():  # rank 0's cache also keeps what the others held or found
        for u, v in list(values.items()) + list(gathered.items()):
            if u not in held and u not in computed:
                cache.adopt_json(units[u][3], v)
    values.update(gathered)
    found: dict[str, dict[str, dict]] = {a: {} for a in attack.attacks}
    for u, (concept, name, _, _) in enumerate(units):
        found[name][concept] = values[u]
    rows = []
    case_group = {_case_key(c): concept for concept, group in groups.items() for c in group}
    for name in attack.attacks:
        makers = {concept: found_prompt(v["found"], v["concept_prompt"]) for concept, v in found[name].items()}

        def prompt_for(case, makers=makers):
            concept = case_group.get(_case_key(case))
            return None if concept is None else makers[concept](case.prompt)
        first = next(iter(found[name].values()))
        info = {"concept": ", ".join(found[name]), "found": first["found"], "steps": first["steps"],
                "seconds": sum(v["seconds"] for v in found[name].values()), "verdict": first["verdict"],
                "concept_prompts": first["concept_prompts"], "budget": {"steps": attack.steps,
                                                                        "time_limit_s": attack.time_limit_s}}
        rows.append(AttackRow(name, prompt_for, info))
    return rows


def _case_key(c: PromptCase) -> tuple:
    return (c.set, c.line, c.case_number, c.prompt, c.seed)


def benchmark_models(model, clip, edited_model, edited_clip, cases: Sequence[PromptCase], settings: Settings,
                     judges: str | Sequence[str], *, edit_key: str, erased: Sequence[str] = (),
                     cache: ResultCache | None = None, ctx: RunContext | None = None, negative: str = "",
                     judge_options: dict | None = None, info: dict | None = None, count=None,
                     attacks: AttackSettings | None = None, edit=None, kept_sets: Sequence[str] = (),
                     worst: int = 0, seed: int = 0, vae=None) -> BenchmarkReport:
    """Run the benchmark on an original MODEL/CLIP and its edited clones. `edit_key` names the edit
    in the cache (`cache.edit_fingerprint`); `count(side, n)` is told of every generator call;
    `attacks` adds the red-team rows (`edit`: the EDIT itself, else read off the MODELs); `vae`
    decodes the pictures for the judges that look at them (nudenet, clip; the tiny models need none)."""
    from .clip_judge import register_clip_judge
    register_clip_judge()  # the clip judge runs on ComfyUI's CLIP vision models: this host's, not the library's
    ctx = ctx or run_context()
    cache = cache or ResultCache(None)
    names = parse_judges(judges)
    views = {"original": ModelView(model, clip, ctx=ctx), "edited": ModelView(edited_model, edited_clip or clip, ctx=ctx)}
    if views["original"].family.name != views["edited"].family.name:
        raise InvalidInputError("the original and the edited MODEL are different model families; connect the model "
                                "the edit was applied to as the original")
    fp = views["original"].fingerprint
    settings = replace(settings, extra={**settings.extra, "latent": list(views["original"].denoiser.latent_size),
                      "negative": negative, "family": fp.get("family", "")})
    sides = {}
    for name, view in views.items():
        host = view.denoiser
        world = "tiny" if view.family.name in TINY_WORLD_FAMILIES else None
        decode = tiny_pictures if world else (vae_pictures(vae) if vae is not None else None)
        jc = JudgeContext(decode=decode, denoiser=host, text=host.text, latent_in=host.latent_in, world=world,
                          should_stop=ctx.should_stop, options=judge_options or {},
                          reference_text=views["original"].denoiser.text)
        gen = comfy_generator(view, settings, negative, ctx)
        if count is not None:
            gen = _counted(gen, name, count)
        sides[name] = Side(model=fp, edit="original" if name == "original" else edit_key, generate=gen,
                           judges=[build_judge(n, jc) for n in names])
    rows = []
    if attacks is not None:
        rows = attack_rows(model, clip, edited_model, edited_clip or clip, edit, cases, erased, kept_sets, attacks,
                           settings, seed, cache, fp, edit_key, ctx)
        if count is not None:
            for r in rows:
                count(f"attack:{r.name}", 0)
    return run_benchmark(cases, sides["original"], sides["edited"], settings, erased, cache, ctx, info,
                         attacks=rows, kept_sets=kept_sets, worst=worst)


def _counted(gen, name, count):
    def generate(prompts, seeds, cfg):
        count(name, len(prompts))
        return gen(prompts, seeds, cfg)
    return generate


def patches_fingerprint(*patchers) -> str:
    """A hash of the patches on ModelPatchers (keys, strengths and tensors, whatever form a patch
    takes): names an edited MODEL/CLIP in the cache when no EDIT is connected."""
    h = hashlib.sha256()

    def walk(v, depth=0):
        if depth > 8:
            h.update(b"...")
        elif isinstance(v, torch.Tensor):
            h.update(distributed.tensor_bytes(v))
        elif isinstance(v, (list, tuple)):
            h.update(f"[{len(v)}".encode())
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                walk(v[k], depth + 1)
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            h.update(type(v).__name__.encode())
            walk({k: x for k, x in vars(v).items() if not k.startswith("_")}, depth + 1)
        else:
            h.update(repr(v).encode())
    for p in patchers:
        walk(getattr(p, "patches", {}) if p is not None else None)
    return h.hexdigest()[:24]


@dataclass
class BenchmarkRun:
    """What `erasure_benchmark` returns: the report, its files, and the two pictures."""

    report: BenchmarkReport
    chart: torch.Tensor                  # IMAGE [1, H, W, 3]
    grid: torch.Tensor                   # IMAGE [1, H, W, 3]: rows original, edited, each attack
    files: list[str] = field(default_factory=list)


def erasure_benchmark(model, clip, prompts: str | Sequence[str], judges: str, settings: Settings, *, seed: int = 0, vae=None,
                      edited_model=None, edited_clip=None, edit=None, strength: float = 1.0,
                      concept: str | None = None, kept: str | Sequence[str] = "", negative: str = "",
                      attacks: AttackSettings | None = None, cache_dir: str | None = None, out_base: str | None = None,
                      worst: int = 8, judge_options: dict | None = None, search: Sequence[str] = (),
                      limit: int = 0, info: dict | None = None, ctx: RunContext | None = None) -> BenchmarkRun:
    """The node's and the command's run: prompts (a path, a file in `search`, or the text itself; the
    same for `kept`, whose sets count as kept), the edited model (`edit` applied to MODEL/CLIP at
    `strength`, or `edited_model`/`edited_clip`), the benchmark, the table written to `out_base`.md
    and .csv, the per-class bar chart and the worst cases' grid (decoded by `vae`)."""
    ctx = ctx or run_context()
    def read(texts, name):
        texts = [texts] if isinstance(texts, str) else list(texts or ())
        return [c for t in texts for c in prompts_from_text_or_path(t, seed, limit, search, name)]
    cases = read(prompts, "prompts")
    if not cases:
        raise InvalidInputError("give prompts: a prompt file (CSV in the papers' layout, .txt, or a folder), its "
                                "name in ComfyUI's input folder, or the prompts themselves, one per line")
    kept_cases = read(kept, "kept")
    names = {c.set for c in cases}
    kept_cases = [replace(c, set=f"kept:{c.set}") if c.set in names else c for c in kept_cases]
    kept_sets = list(dict.fromkeys(c.set for c in kept_cases))
    if edit is not None and edited_model is not None:
        raise InvalidInputError("connect either the EDIT (applied to the original here) or the edited MODEL, not both")
    if edit is not None:
        edited_model, edited_clip, warnings = apply_edit(model, clip, edit, strength)
        for w in warnings:
            log.warning("%s", w)
        edit_key = edit_fingerprint(edit, strength)
        erased = concept_words(concept or None, edit.concepts)
    elif edited_model is not None:
        edit_key = "patches-" + patches_fingerprint(edited_model, getattr(edited_clip, "patcher", None))
        erased = concept_words(concept or "")
    else:
        raise InvalidInputError("connect the edited MODEL (and CLIP for a text-encoder edit) or an EDIT to benchmark")
    judge_options = dict(judge_options or {})
    judge_options["presence"] = {"concepts": erased, **(judge_options.get("presence") or {})}
    if "clip" in parse_judges(judges):
        # zero-shot CLIP labels each picture among the erased concepts, the prompt file's other classes
        # and a neutral option, unless the user names them
        lowered = {e.lower() for e in erased}
        kept_labels = [c for c in dict.fromkeys(x.label for x in cases + kept_cases if x.label) if c.lower() not in lowered]
        judge_options["clip"] = {"concepts": erased, "kept": kept_labels, **(judge_options.get("clip") or {})}
    cache = ResultCache(cache_dir or None)
    report = benchmark_models(model, clip, edited_model, edited_clip, cases + kept_cases, settings, judges,
                              edit_key=edit_key, erased=erased, cache=cache, ctx=ctx, negative=negative,
                              judge_options=judge_options, info={"base_seed": seed, **(info or {})}, attacks=attacks,
                              edit=edit, kept_sets=kept_sets, worst=worst, seed=seed, vae=vae)
    files = list(report.write(out_base)) if out_base and distributed.is_main() else []  # torchrun: rank 0 writes
    chart = bar_chart(report.chart_groups())
    grid = worst_grid(report, model, vae)
    return BenchmarkRun(report, chart, grid, files)


def worst_grid(report: BenchmarkReport, model, vae=None) -> torch.Tensor:
    """The worst cases' pictures, one row per column (original, edited, each attack), decoded by `vae`
    (without one, the latents' first three channels scaled to 0..1)."""
    pics = report.worst.get("pictures") or {}
    if not pics:
        return torch.ones(1, 64, 64, 3)

    def decode(latents):
        if vae is not None:
            img = vae.decode(latents)
            return img.reshape(-1, *img.shape[-3:]).float().cpu()
        x = frames(model.model.process_latent_out(latents)[:, :3].float().cpu())
        lo, hi = x.amin(), x.amax()
        return ((x - lo) / (hi - lo).clamp_min(1e-6)).movedim(1, -1)
    return image_grid([decode(p) for p in pics.values()])

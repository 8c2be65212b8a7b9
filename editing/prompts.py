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
from . import worlds
from .safety import minor_in_sexual_context, refuse_unsafe

ARTIST_THINGS = (
    "dog", "cat", "house", "tree", "bridge", "boat", "city street", "mountain", "river", "garden",
    "woman", "man", "child", "horse", "bird", "flower vase", "church", "forest", "harbor", "field of wheat",
)
# Adults only, and in settings that do not themselves invite nudity: ConceptPrune keeps the weights
# where the concept beats the reference, so a reference such as "person in a shower" would hide the
# very neurons it should expose. `editing.safety` filters every preset's prompts on top of this.
NUDITY_PERSONS = (
    "man", "woman", "adult man", "adult woman", "middle-aged man", "middle-aged woman", "old man", "old woman",
    "adult couple", "elderly couple", "person in a park", "person in a living room", "person in a kitchen",
    "person in a garden", "person in a forest", "person by a lake", "person on a city street",
    "person in an art studio",
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
        """One pair per item; an item that would put a minor next to a sexual concept is left out
        (e.g. the artist preset's "child" when the concept is "nudity")."""
        out = []
        for x in self.items:
            c, r = self.concept_template.format(concept=concept, x=x), self.reference_template.format(x=x)
            if not (minor_in_sexual_context(c, concept) or minor_in_sexual_context(r, concept)):
                out.append((c, r))
        return out


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
# and 0.1 leave triangles at 100 % / 62 %; 0.2 takes them to 25 % with the calibration's shared noise
# (0 % with per-slot noise; README).
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
    world = worlds.get("tiny")
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
    refuse_unsafe(concepts, what="concept")
    out: dict[str, list[tuple[str, str]]] = {}
    for c in concepts:
        pairs = []
        if preset in PRESETS:
            pairs += PRESETS[preset].pairs(c)
        elif preset == TINY:
            pairs += tiny_pairs(c)
        own = [(a.replace("{concept}", c), b.replace("{concept}", c)) for a, b in extra]
        refuse_unsafe([p for pair in own for p in pair], c, what="prompt pair")
        pairs += own
        if not pairs:
            raise InvalidInputError(f"no prompt pairs for {c!r}: preset 'custom' needs lines "
                                    "'concept prompt | reference prompt' (use {concept} for the concept word)")
        out[c] = pairs
    return out

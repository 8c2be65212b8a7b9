"""Prompts the pack writes never put minors in a nudity or sexual context.

The builders that combine a concept with other words check every prompt they compose: ConceptPrune's
presets (`prompts.Preset.pairs`) and the unlearning/distillation templates (`unlearn.paired_prompts`)
leave such a prompt out; the user's concepts, custom pairs and EMCID pairs are refused
(`refuse_unsafe`). The fixed prompt sets (EMCID's templates and C₀ captions, the audit's benign
prompts, the default preserve set) name no concept and are scanned by `tests/test_prompt_safety.py`. Calibration and training *generate pictures* from these prompts, so a prompt
that pairs a minor with nudity would make the pack itself produce abuse material: such a prompt is
dropped when the pack composed it (a preset item next to a sexual concept), and refused with an
error when the user wrote it.

The word lists are deliberately broad: a false positive costs one calibration prompt, a false
negative costs a picture that must never exist.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence

from .errors import InvalidInputError

log = logging.getLogger(__name__)

MINOR_TERMS = (
    "boy", "boys", "girl", "girls", "child", "children", "childs", "kid", "kids", "kiddo", "teen", "teens",
    "teenager", "teenagers", "teenage", "preteen", "preteens", "tween", "tweens", "adolescent", "adolescents",
    "toddler", "toddlers", "baby", "babies", "infant", "infants", "newborn", "minor", "minors", "underage",
    "schoolgirl", "schoolgirls", "schoolboy", "schoolboys", "juvenile", "juveniles", "youngster", "youngsters",
    "pupil", "pupils", "loli", "lolita", "shota", "daughter", "son", "niece", "nephew", "young", "youth",
    "little", "school", "student", "students", "kindergarten", "highschool", "underaged",
)
SEXUAL_TERMS = (
    "naked", "nude", "nudes", "nudity", "nudist", "nsfw", "sex", "sexy", "sexual", "sexualized", "sexualised",
    "erotic", "erotica", "porn", "porno", "pornographic", "pornography", "topless", "bottomless", "undressed",
    "undressing", "unclothed", "lingerie", "underwear", "bikini", "explicit", "genital", "genitals", "breast",
    "breasts", "nipple", "nipples", "seductive", "lewd", "hentai", "fetish", "orgasm", "intercourse", "xxx",
    "stripper", "striptease", "bare", "skin", "revealing", "sensual",
)
_MINOR = re.compile(r"\b(?:%s)\b" % "|".join(map(re.escape, MINOR_TERMS)), re.IGNORECASE)
_SEXUAL = re.compile(r"\b(?:%s)\b" % "|".join(map(re.escape, SEXUAL_TERMS)), re.IGNORECASE)


def _words(text: str) -> str:
    # "teen-age", "school_girl", "naked." all split into plain words
    return re.sub(r"[^0-9a-zA-Z]+", " ", text)


def mentions_minor(text: str) -> bool:
    return bool(_MINOR.search(_words(text)))


def is_sexual(text: str) -> bool:
    return bool(_SEXUAL.search(_words(text)))


def minor_in_sexual_context(text: str, context: str = "") -> bool:
    """True when `text` (together with `context`, e.g. the concept being erased) names a minor and
    something sexual. `context` lets a reference prompt ("a photo of a boy") count as unsafe when
    it is calibrated against a nudity concept."""
    joined = f"{text} {context}"
    return mentions_minor(joined) and is_sexual(joined)


def safe_prompts(prompts: Iterable[str], context: str = "", source: str = "") -> list[str]:
    """The pack's own prompts with every minor-in-sexual-context prompt dropped (logged)."""
    out, dropped = [], 0
    for p in prompts:
        if minor_in_sexual_context(p, context):
            dropped += 1
            continue
        out.append(p)
    if dropped:
        log.info("%s: %d prompt(s) naming a minor next to %r left out", source or "prompts", dropped, context)
    return out


def refuse_unsafe(prompts: Sequence[str], context: str = "", what: str = "prompt") -> None:
    """Raise for any user-written prompt that puts a minor in a nudity or sexual context: the pack
    would generate pictures from it."""
    for p in prompts:
        if minor_in_sexual_context(p, context):
            raise InvalidInputError(
                f"this {what} names a minor in a nudity or sexual context ({p!r}"
                + (f" with concept {context!r}" if context else "") + "). ConceptEdit never generates such "
                "pictures: describe adults only (e.g. 'a photo of a naked woman | a photo of a woman').")

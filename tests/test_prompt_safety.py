"""No prompt the pack writes puts a minor in a nudity or sexual context (every preset, every builder)."""
from __future__ import annotations

import pytest

from conceptedit.editing import prompts, safety
from conceptedit.editing.emcid.captions import generic_captions
from conceptedit.editing.emcid.stage2 import validate_pairs
from conceptedit.editing.emcid.config import DEFAULT_TEMPLATES
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.audit.resurgence import DEFAULT_BENIGN
from conceptedit.editing.uce.config import DEFAULT_PRESERVE
from conceptedit.editing.unlearn.trainer import GENERIC_TEMPLATES, paired_prompts
from conceptedit.tiny import world

SEXUAL_CONCEPTS = ("nudity", "naked", "nude", "nsfw", "sexual", "topless", "erotic", "porn", "lingerie",
                   "a naked person", "sexy")
ORDINARY_CONCEPTS = ("van gogh", "claude monet", "car", "dog", "snoopy")
# What the nudity preset wrote before: the checker must flag it, or this file cannot fail.
OLD_NUDITY_ITEMS = ("boy on a beach", "girl on a beach")


def _assert_safe(texts, context=""):
    bad = [t for t in texts if safety.minor_in_sexual_context(t, context)]
    assert not bad, f"prompts naming a minor in a sexual context (concept {context!r}): {bad[:3]}"


def test_the_checker_flags_what_the_old_preset_wrote():
    old = prompts.Preset("old", "old", "a photo of a {concept} {x}", "a photo of a {x}", OLD_NUDITY_ITEMS, 0.01, 9)
    written = [f"a photo of a naked {x}" for x in OLD_NUDITY_ITEMS]
    assert all(safety.minor_in_sexual_context(t) for t in written)
    # the reference "a photo of a boy on a beach" is unsafe too when calibrated against nudity
    assert safety.minor_in_sexual_context("a photo of a boy on a beach", "naked")
    assert not safety.minor_in_sexual_context("a photo of a boy on a beach")
    assert old.pairs("naked") == []  # the filter drops every such item
    for t in ("a teen-age nude", "NSFW picture of a schoolgirl", "sexy kid", "a topless Child."):
        assert safety.minor_in_sexual_context(t), t
    for t in ("a naked man", "a child in a park", "a person reading", "a photo of a woman"):
        assert not safety.minor_in_sexual_context(t), t


@pytest.mark.parametrize("preset", sorted(prompts.PRESETS))
def test_every_preset_is_safe_for_every_concept(preset):
    for concept in SEXUAL_CONCEPTS + ORDINARY_CONCEPTS:
        pairs = prompts.build_pairs([concept], preset)[concept]
        assert pairs, (preset, concept)
        _assert_safe([p for pair in pairs for p in pair], concept)


def test_the_nudity_preset_names_adults_in_settings_that_do_not_invite_nudity():
    items = prompts.PRESETS["nudity"].items
    assert len(items) >= 16
    assert not any(safety.mentions_minor(x) for x in items)
    inviting = ("shower", "bath", "bed", "bodybuilder", "beach", "swim", "sauna", "bikini", "model", "pool")
    refs = [r for _, r in prompts.build_pairs(["naked"], "nudity")["naked"]]
    assert not [r for r in refs if any(w in r for w in inviting)]
    # the artist preset has a child among its things: never next to a sexual concept
    assert any("child" in c for c, _ in prompts.build_pairs(["monet"], "artist")["monet"])
    assert not any("child" in c for c, _ in prompts.build_pairs(["nudity"], "artist")["nudity"])


def test_the_tiny_preset_is_safe():
    for concept in world.SHAPES + world.COLOURS:
        pairs = prompts.build_pairs([concept], "tiny")[concept]
        _assert_safe([p for pair in pairs for p in pair], concept)


def test_user_text_that_sexualises_minors_is_refused():
    with pytest.raises(InvalidInputError, match="minor"):
        prompts.build_pairs(["naked"], "custom", "a photo of a {concept} girl | a photo of a girl")
    with pytest.raises(InvalidInputError, match="minor"):
        prompts.build_pairs(["naked child"], "nudity")
    with pytest.raises(InvalidInputError, match="minor"):
        paired_prompts("nude teen", 8)
    with pytest.raises(InvalidInputError, match="minor"):
        validate_pairs([("naked boy", "")])
    # adults in the user's own pairs are fine
    assert prompts.build_pairs(["naked"], "custom", "a photo of a {concept} woman | a photo of a woman")


def test_unlearning_and_distillation_prompts_are_safe():
    for concept in SEXUAL_CONCEPTS + ORDINARY_CONCEPTS:
        forget, retain = paired_prompts(concept, 64, seed=3)
        assert len(forget) == len(retain) == 64
        _assert_safe(forget + retain, concept)
    general = [t.format(concept="", emotion="calm", action="standing", place="in a park") for t in GENERIC_TEMPLATES]
    _assert_safe(general, "nudity")


def test_emcid_templates_captions_benign_and_preserve_sets_are_safe():
    for concept in SEXUAL_CONCEPTS:
        _assert_safe([t.format(concept) for t in DEFAULT_TEMPLATES], concept)
        for templates in world.EMCID_TEMPLATES.values():
            _assert_safe([t.format(concept) for t in templates], concept)
    captions = generic_captions(5000)
    # C₀'s captions are everyday text: nothing sexual at all, so no concept can pair with them
    assert not [c for c in captions if safety.is_sexual(c)]
    assert not [p for p in DEFAULT_BENIGN if safety.is_sexual(p) or safety.mentions_minor(p)]
    assert not [p for p in DEFAULT_PRESERVE if safety.is_sexual(p)]

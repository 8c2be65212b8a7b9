"""Synthetic worlds the pack writes prompts for and classifies (the bundled tiny model's), injected
by the host so that the library never imports them: the pack's `__init__.py` registers `tiny/`.

A world is an object with the tiny world's vocabulary (`kind_of`, `words`, `COLOURS`, `SHAPES`,
`STYLES`, `NAMED_STYLES`, `prompts_for`, `synonym_prompts`, ...); its classifier loader returns an
object with `predict(images) -> {kind: [label, ...]}`."""
from __future__ import annotations

from typing import Any, Callable

from .errors import InvalidInputError

_WORLDS: dict[str, Any] = {}
_CLASSIFIERS: dict[str, Callable[[], Any]] = {}


def register(name: str, world: Any, load_classifier: Callable[[], Any] | None = None) -> None:
    _WORLDS[name] = world
    if load_classifier is not None:
        _CLASSIFIERS[name] = load_classifier


def get(name: str = "tiny") -> Any:
    try:
        return _WORLDS[name]
    except KeyError:
        raise InvalidInputError(f"the {name} world is not available in this install (its folder is missing); "
                                "use another preset, or pass your own prompts and classifier") from None


def classifier(name: str = "tiny") -> Any:
    get(name)
    try:
        return _CLASSIFIERS[name]()
    except KeyError:
        raise InvalidInputError(f"the {name} world has no classifier; pass classify=") from None

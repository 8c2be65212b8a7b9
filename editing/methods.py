"""Every method the pack runs, by name: its job config (`<package>/config.py`) and its
``compute(host, config) -> Edit`` (`<package>/compute.py`). The hosts run a method through this one
table (ComfyUI: `comfy_host.jobs.run`, which the nodes, the command line and the benches call), so a
new method is a package with those two modules and a line here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .concept_prune import compute as concept_prune
from .concept_prune.config import ConceptPruneJob
from .distill import compute as distill
from .distill.config import DistillJob
from .edit import Edit
from .emcid import compute as emcid
from .emcid.config import EmcidJob
from .errors import InvalidInputError
from .hosts import Host, Job
from .uce import compute as uce
from .uce.config import UCEJob
from .unlearn import compute as unlearn
from .unlearn.config import UnlearnJob


@dataclass(frozen=True)
class Method:
    name: str
    config: type[Job]                          # the job config `compute` takes
    compute: Callable[[Host, Job], Edit]
    title: str                                 # how progress texts name it ("EMCID: 12/1000 concepts, …")
    progress_text: bool = False                # whether its long phases show a time-left text under the node


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("uce", UCEJob, uce.compute, "UCE"),
    Method("concept_prune", ConceptPruneJob, concept_prune.compute, "ConceptPrune calibration", progress_text=True),
    Method("emcid", EmcidJob, emcid.compute, "EMCID", progress_text=True),
    Method("unlearn", UnlearnJob, unlearn.compute, "Unlearning"),
    Method("distill_unlearn", DistillJob, distill.compute, "Distill and unlearn"),
)}


def method(name: str, config: Job) -> Method:
    """The method `name`, refused when unknown or when `config` is not its job config."""
    if name not in METHODS:
        raise InvalidInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    m = METHODS[name]
    if not isinstance(config, m.config):
        raise InvalidInputError(f"the {name} job takes a {m.config.__name__}, not a {type(config).__name__}")
    return m

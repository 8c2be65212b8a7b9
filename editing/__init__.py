"""ConceptEdit's library: pure torch, never imports ComfyUI.

Core: `arch` (layouts read from a model's keys; names and defaults of known families), `edit` (the
Edit type and its file format), `scope` (which keys each method may change), `hosts` (what a host
provides), `diffusion` (the noising and sampling formulas), `training` (adapters on a frozen network
and the one training-loop skeleton), `hooks` (forward hooks by module name), `prompts`, `safety`,
`worlds`. One package per method: `uce`, `concept_prune`, `emcid`, `unlearn`, `distill`; then
`audit` (presence, resurgence), `export` (LoRA, diffusers) and `report` (plots, web view).
"""
from .arch import FAMILIES, Family, detect_family, fingerprint, get_family  # noqa: F401
from .edit import Change, Edit, combine  # noqa: F401
from .errors import (Cancelled, ConceptEditError, EditFileError, FingerprintMismatchError,  # noqa: F401
                     InvalidInputError, NonFiniteError, UnknownArchitectureError)

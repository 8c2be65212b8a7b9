"""ConceptEdit's library: pure torch, never imports ComfyUI.

Modules: `arch` (model-family tables), `edit` (the Edit type and its file format), `hosts`
(what a host provides), `hooks` (statistics by module name), one module per method.
"""
from .arch import FAMILIES, Family, detect_family, fingerprint, get_family  # noqa: F401
from .edit import Change, Edit, combine  # noqa: F401
from .errors import (Cancelled, ConceptEditError, EditFileError, FingerprintMismatchError,  # noqa: F401
                     InvalidInputError, NonFiniteError, UnknownArchitectureError)

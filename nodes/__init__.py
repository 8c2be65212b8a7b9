"""The node registry: merges each nodes_*.py module's mappings. Node IDs are public API and are
prefixed ``ConceptEdit``; never rename one (add a _v2 instead)."""
from . import nodes_files

_MODULES = [nodes_files]

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in _MODULES:
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)

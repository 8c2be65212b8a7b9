"""The node registry: merges each nodes_*.py module's mappings. Node IDs are public API and are
prefixed ``ConceptEdit``; never rename one (add a _v2 instead)."""
from . import nodes_distill, nodes_emcid, nodes_files, nodes_prune, nodes_redteam, nodes_uce, nodes_unlearn, nodes_view

_MODULES = [nodes_files, nodes_prune, nodes_uce, nodes_emcid, nodes_unlearn, nodes_redteam, nodes_distill, nodes_view]

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in _MODULES:
    clash = set(NODE_CLASS_MAPPINGS) & set(_m.NODE_CLASS_MAPPINGS)
    assert not clash, f"node IDs defined twice: {clash}"
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)

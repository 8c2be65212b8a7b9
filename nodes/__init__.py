"""The node registry: every nodes_*.py module's NODES, as ComfyUI's V3 extension. Node IDs are
public API and are prefixed ``ConceptEdit``; never rename one (add a _v2 instead)."""
from comfy_api.latest import ComfyExtension

from . import (
    nodes_benchmark,
    nodes_distill,
    nodes_emcid,
    nodes_files,
    nodes_prune,
    nodes_redteam,
    nodes_uce,
    nodes_unlearn,
    nodes_view,
)

_MODULES = [nodes_files, nodes_prune, nodes_uce, nodes_emcid, nodes_unlearn, nodes_redteam, nodes_distill, nodes_view,
            nodes_benchmark]

NODES: list = [cls for m in _MODULES for cls in m.NODES]
# node ID -> class and display name, for the pack's own tools (docs, example workflows, tests)
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _cls in NODES:
    _schema = _cls.GET_SCHEMA()
    assert _schema.node_id not in NODE_CLASS_MAPPINGS, f"node ID defined twice: {_schema.node_id}"
    NODE_CLASS_MAPPINGS[_schema.node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name


class ConceptEditExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    return ConceptEditExtension()

"""ConceptEdit: erase, redirect, debias and audit concepts in text-to-image diffusion models.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS. Imported anywhere else
(tests, the command line, A1111), it registers nothing and fails nothing: the nodes load only
when ComfyUI itself is already imported.
"""
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"



def _register_tiny_world() -> None:
    """The bundled tiny world (pure python) for the library's `tiny` preset and evaluation; its
    classifier loads (with torch) only when asked for. A stripped install without tiny/ skips it."""
    try:
        from .editing import worlds
        from .tiny import world
    except ImportError:
        return

    def load_classifier():
        from .tiny.classifier import load_classifier as load
        return load()

    worlds.register("tiny", world, load_classifier)


_register_tiny_world()

if "comfy.model_patcher" in sys.modules or "comfy.model_management" in sys.modules:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

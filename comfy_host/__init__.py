"""Adapters between ComfyUI objects (ModelPatcher, CLIP) and the pure-torch `editing` library.

Imports ComfyUI lazily: call `locate.ensure_comfy()` first when running outside ComfyUI.
"""

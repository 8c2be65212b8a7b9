"""ComfyUI's progress bar and Cancel button as the library's `RunContext`."""
from __future__ import annotations



from ..editing.hosts import RunContext


# ---- progress and cancel -------------------------------------------------------------------
def run_context(total_hint: int | None = None) -> RunContext:
    """A RunContext wired to ComfyUI's progress bar and its Cancel button."""
    import comfy.model_management as mm
    import comfy.utils

    bars: dict[int, object] = {}

    def progress(done: int, total: int) -> None:
        bar = bars.get(total)
        if bar is None:
            bar = bars[total] = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    def should_stop() -> bool:
        # raises ComfyUI's own InterruptProcessingException, which its executor reports as "interrupted"
        mm.throw_exception_if_processing_interrupted()
        return False

    return RunContext(progress=progress, should_stop=should_stop, device=mm.get_torch_device())

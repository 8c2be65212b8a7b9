"""Distill-and-unlearn as a method: ``compute(host, config) -> Edit``. The host's model is the pruned
student, `config.teacher` the full model it is distilled from, read through the same text encoder."""
from __future__ import annotations

from ..edit import Edit
from ..errors import InvalidInputError
from ..hosts import Host
from .bilevel import compute_distill_unlearn
from .config import DistillJob


def compute(host: Host, config: DistillJob) -> Edit:
    """A student made from the teacher by patches (ConceptPrune, Apply Concept Edit, a pruning mask)
    trains on the teacher's own network with that pruning held fixed; a student of its own (other
    layout or weights) trains on its network against the teacher's predictions. Neither changes."""
    if config.teacher is None:
        raise InvalidInputError("connect the pruned student MODEL and the full teacher MODEL it is distilled from")
    teacher = host.other(config.teacher)
    student_edit = host.difference(teacher)
    student = None
    if student_edit is None:
        s_ctx, t_ctx = host.family.context_dim, teacher.family.context_dim
        if s_ctx != t_ctx:
            raise InvalidInputError(f"the student reads text of width {s_ctx}, the teacher {t_ctx}: both must use the "
                                    "connected CLIP")
        # a student of its own draws at the teacher's size unless the job sets one
        student = (host if host.latent is not None else host.other(latent=teacher.cells8())).denoiser
    with host.training(freeze=False):  # the trainer freezes both networks itself
        return compute_distill_unlearn(teacher.denoiser, teacher.denoiser.text, student_edit, config.concept,
                                       config.settings, distill_prompts=list(config.distill_prompts),
                                       family=host.family.name, ctx=host.ctx, student=student)

"""UCE as a method: ``compute(host, config) -> Edit``, the closed form from the host's unpatched
weights, or the closed-loop debias edit around it when the job has a `loop`."""
from __future__ import annotations

from typing import Callable

from ..edit import Edit
from ..hosts import Host, RunContext
from .closed_form import compute_uce
from .config import UCEJob
from .debias import debias_uce, presence_judge


def compute(host: Host, config: UCEJob) -> Edit:
    if config.loop is None:
        return compute_uce(host.text, host.weights, host.family, config.settings, host.ctx, norms=host.text_norms)
    loop = config.loop
    # each round's edit goes onto a copy that generates the concepts at the job's size, the judge reads
    # the shares, and the next round re-solves from the unpatched weights
    base = host.sampler()

    def generate(edit, prompts, seed):
        return (base if edit is None else host.sampler(edit)).sample(list(prompts), steps=loop.steps, cfg=loop.cfg,
                                                                     seed=seed)

    # the solve reads `host.text` (debias_uce keeps its own encode-once memo); the sampler its own
    return debias_uce(host.text, host.weights, host.family, config.settings, loop, generate,
                      _judge(host, config, base), host.ctx, norms=host.text_norms)


def _judge(host: Host, config: UCEJob, base) -> Callable:
    """The job's judge as ``judge(latents, options, concept) -> scores``: None is the unedited model as a
    diffusion classifier on latents, a plain callable is taken as it is, and anything else is an
    image model the host turns into one."""
    judge = config.judge
    if judge is None:
        quiet = RunContext(should_stop=host.ctx.should_stop, device=host.ctx.device)
        return presence_judge(base, base.text, to_x0=getattr(base, "latent_in", None), ctx=quiet)
    if callable(judge) and not hasattr(judge, "encode_image"):
        return judge
    return host.picture_judge(judge, config.vae, config.judge_template)

"""One prediction path: `ComfyDenoiser.eps` is the model's ε for EPS, v-prediction and rectified-flow models (by
ComfyUI's own model sampling), SDXL's vector conditioning y reaches every direct UNet call, and the
training jobs, the resurgence audit, distillation and presence run on a v-prediction model and on an
SDXL-conditioned one (real ComfyUI models at tiny widths, random weights)."""
import math

import pytest
import torch

from conceptedit.comfy_host.denoiser import ComfyDenoiser, _model_sampling
from conceptedit.comfy_host.jobs import UnlearnJob, run
from conceptedit.comfy_host.audits import audit_models
from conceptedit.comfy_host.view import ModelView
from conceptedit.editing.distill.bilevel import compute_distill_unlearn
from conceptedit.editing.distill.config import DistillConfig
from conceptedit.editing.errors import ConceptEditError, InvalidInputError
from conceptedit.editing.hosts import conditioning
from conceptedit.editing.training import frozen_session
from conceptedit.editing.audit.presence import PresenceConfig, presence_scores
from conceptedit.editing.audit.resurgence import AuditConfig
from conceptedit.editing.unlearn.config import UnlearnConfig
from helpers import random_clip, random_model, sdxl_style_model


@pytest.fixture(scope="module")
def clip(comfy):
    return random_clip()


def _v_model(comfy, seed=0):
    import comfy.model_base
    return random_model(seed=seed, model_type=comfy.model_base.ModelType.V_PREDICTION)


def _noised(den, seed=0, n=2, t=(30, 700)):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor(t[:n])
    a = den.alphas_cumprod()[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, a


def test_eps_of_a_v_model_is_what_comfyuis_own_sampling_implies(comfy, clip):
    model = _v_model(comfy)
    den = ComfyDenoiser(model, clip)
    assert any(c.__name__ == "V_PREDICTION" for c in type(model.model.model_sampling).__mro__)
    xt, t, a = _noised(den)
    c = den.text.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        e = den.eps(xt, t, c)
        # ComfyUI's own path: its σ-space input x_σ = x_t/√ᾱ, its denoised x₀ (V_PREDICTION.calculate_denoised)
        ms = model.model.model_sampling
        sigma = ms.sigmas[t]
        x_sigma = xt / a.sqrt()
        x0_comfy = model.model.apply_model(x_sigma, sigma, c_crossattn=c)
        x0_ours = (xt - (1 - a).sqrt() * e) / a.sqrt()
        torch.testing.assert_close(x0_ours, x0_comfy, atol=1e-4, rtol=1e-4)
        # and the closed form ε = √ᾱ v + √(1−ᾱ) x_t on the raw output v
        v = model.model.diffusion_model(xt, timesteps=t, context=c).float()
        torch.testing.assert_close(e, a.sqrt() * v + (1 - a).sqrt() * xt, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(e, v, atol=1e-2)  # the raw output is not ε


def test_eps_of_an_eps_model_is_its_raw_output_and_differentiable(comfy, clip):
    model = random_model()
    den = ComfyDenoiser(model, clip)
    xt, t, _ = _noised(den)
    c = den.text.encode(["a red circle", "a blue square"]).detach().clone()
    x = xt.clone().requires_grad_(True)
    ctx = c.clone().requires_grad_(True)
    with frozen_session(den.unet()):  # as every trainer runs (ComfyUI's blocks add residuals in place)
        e = den.eps(x, t, ctx)
        e.square().sum().backward()
    with torch.no_grad():
        raw = model.model.diffusion_model(xt, timesteps=t, context=c).float()
    torch.testing.assert_close(e.detach(), raw, atol=1e-4, rtol=1e-4)
    assert x.grad is not None and ctx.grad is not None
    assert float(x.grad.abs().sum()) > 0 and float(ctx.grad.abs().sum()) > 0


def test_v_gradient_equals_the_closed_form_gradient(comfy, clip):
    model = _v_model(comfy, seed=3)
    den = ComfyDenoiser(model, clip)
    xt, t, a = _noised(den, t=(500, 900))
    c = den.text.encode(["a red circle", "a circle"]).detach().clone()
    with frozen_session(den.unet()):
        grads = _grads(den, model, xt, t, c, a)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-3)


def _grads(den, model, xt, t, c, a):
    grads = []
    def closed_form(x):  # ε = √ᾱ v + √(1−ᾱ) x_t on the raw output v
        return a.sqrt() * model.model.diffusion_model(x, timesteps=t, context=c).float() + (1 - a).sqrt() * x

    for fn in (lambda x: den.eps(x, t, c), closed_form):
        x = xt.clone().requires_grad_(True)
        fn(x).square().sum().backward()
        grads.append(x.grad)
    return grads


def test_model_sampling_object_patch_is_honoured(comfy, clip):
    """A MODEL marked v-prediction by an object patch (what ComfyUI's ModelSamplingDiscrete node does)
    is converted as a v-model, and the unpatched input stays an EPS model."""
    eps_model = random_model(seed=2)
    v_sampling = _v_model(comfy).model.model_sampling
    marked = eps_model.clone()
    marked.add_object_patch("model_sampling", v_sampling)
    plain, vden = ComfyDenoiser(eps_model, clip), ComfyDenoiser(marked, clip)
    xt, t, a = _noised(plain)
    c = plain.text.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        e_v = vden.eps(xt, t, c)
        e_plain = plain.eps(xt, t, c)
        raw = eps_model.model.diffusion_model(xt, timesteps=t, context=c).float()
    torch.testing.assert_close(e_plain, raw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(e_v, a.sqrt() * raw + (1 - a).sqrt() * xt, atol=1e-4, rtol=1e-4)


class _Flow:
    """ComfyUI's rectified-flow sampling (CONST + ModelSamplingDiscreteFlow: x_σ = (1 − σ)·x₀ + σ·ε,
    output v = ε − x₀, σ shifted by 3), written on ModelSamplingDiscrete so that the 2024-03 copy,
    which has neither class, runs the same test."""

    @staticmethod
    def make(comfy):
        import comfy.model_sampling as cms

        class Flow(cms.ModelSamplingDiscrete):
            def __init__(self):
                super().__init__()
                u = torch.arange(1, 1001, dtype=torch.float64) / 1000
                self.register_buffer("sigmas", (3 * u / (1 + 2 * u)).float())

            def timestep(self, sigma):
                return sigma * 1000

            def calculate_input(self, sigma, noise):
                return noise

            def calculate_denoised(self, sigma, model_output, model_input):
                return model_input - model_output * sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))

            def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
                return sigma * noise + (1.0 - sigma) * latent_image

        return Flow()


def test_eps_of_a_flow_model_is_what_comfyuis_own_sampling_implies(comfy, clip):
    flow = random_model().clone()
    flow.add_object_patch("model_sampling", _Flow.make(comfy))
    den = ComfyDenoiser(flow, clip)
    ac = den.alphas_cumprod()
    sf = _model_sampling(flow).sigmas.clamp(max=1 - 1e-3)
    # the DDPM ᾱ of equal noise level: σ_d = σ_f / (1 − σ_f), ᾱ = 1 / (1 + σ_d²)
    torch.testing.assert_close(ac, 1 / (1 + (sf / (1 - sf)) ** 2))
    assert float(ac[0]) > 0.99 and float(ac[-1]) < 1e-5
    xt, t, a = _noised(den, t=(100, 900))
    c = den.text.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        e = den.eps(xt, t, c)
        base = flow.model
        s = sf[t].view(-1, 1, 1, 1)
        x_flow = xt / a.sqrt() * (1 - s)  # (1 − σ_f)·x₀ + σ_f·ε
        x0_comfy = base.apply_model(x_flow, sf[t], c_crossattn=c)
        x0_ours = (xt - (1 - a).sqrt() * e) / a.sqrt()
        torch.testing.assert_close(x0_ours, x0_comfy.float(), atol=1e-4, rtol=1e-4)


def test_training_losses_on_a_flow_model_are_its_velocity_mse(comfy, clip):
    """The ε-objectives weighted by `objective_mse` are, on a rectified-flow model, the MSE of the
    velocity v = ε − x₀ that ComfyUI's own model output predicts; an EPS model keeps its ε-MSE."""
    import torch.nn.functional as F
    from conceptedit.editing.diffusion import add_noise, objective_mse, objective_weights
    flow = random_model().clone()
    flow.add_object_patch("model_sampling", _Flow.make(comfy))
    den = ComfyDenoiser(flow, clip)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([150, 950])
    xt = add_noise(x0, noise, t, den.alphas_cumprod())
    c = den.text.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        loss = objective_mse(den, den.eps(xt, t, c), noise, t)
        sf = _model_sampling(flow).sigmas[t].float().view(-1, 1, 1, 1)
        x_flow = (1 - sf) * x0 + sf * noise
        v_hat = (x_flow - flow.model.apply_model(x_flow, sf.flatten(), c_crossattn=c).float()) / sf
        torch.testing.assert_close(loss, F.mse_loss(v_hat, noise - x0), atol=1e-4, rtol=1e-3)
        w = objective_weights(den, t)
        assert float(w[1]) > 50 * float(w[0])  # the high noise levels count as the model trained them
        eps_model = ComfyDenoiser(random_model(), clip)
        assert objective_weights(eps_model, t) is None
        e = eps_model.eps(xt, t, c)
        torch.testing.assert_close(objective_mse(eps_model, e, noise, t), F.mse_loss(e, noise))


def test_an_unknown_noising_is_refused_clearly(comfy, clip):
    import comfy.model_sampling as cms

    class Odd(cms.ModelSamplingDiscrete):
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return sigma * noise + 0.5 * latent_image

    odd = random_model().clone()
    odd.add_object_patch("model_sampling", Odd())
    den = ComfyDenoiser(odd, clip)
    with pytest.raises(ConceptEditError, match="rectified-flow"):
        den.alphas_cumprod()
    with pytest.raises(ConceptEditError, match="rectified-flow"):
        den.eps(torch.zeros(1, 4, 8, 8), torch.tensor([10]), torch.zeros(1, 77, 64))


def test_sdxl_conditioning_goes_with_every_prompt(comfy, clip):
    model = sdxl_style_model(64)
    den = ComfyDenoiser(model, clip)
    c, y = conditioning(den, den.text, ["a red circle", ""])
    assert c.shape == (2, 77, 64) and y.shape == (2, 64 + 6 * 256)
    xt, t, _ = _noised(den)
    with pytest.raises(InvalidInputError, match="vector conditioning y"):
        den.eps(xt, t, c)
    with torch.no_grad():
        e = den.eps(xt, t, c, y=y)
        e0 = den.eps(xt, t, c, y=torch.zeros_like(y))
    assert torch.isfinite(e).all() and not torch.allclose(e, e0)
    assert conditioning(ComfyDenoiser(random_model(), clip), den.text, ["a"])[1] is None  # SD1-style: no y


def _finite_edit(edit):
    assert edit.changes
    for ch in edit.changes.values():
        d = ch.delta(None, dtype=torch.float32)
        assert torch.isfinite(d).all()
    return sum(float(ch.delta(None, dtype=torch.float32).abs().sum()) for ch in edit.changes.values())


@pytest.mark.parametrize("kind", ["sdxl", "v"])
def test_unlearn_and_audit_jobs_run_on_sdxl_and_v_models(comfy, clip, kind):
    with torch.inference_mode():  # as ComfyUI's executor runs a prompt
        model = sdxl_style_model(64) if kind == "sdxl" else _v_model(comfy)
        before = {k: v.clone() for k, v in model.model_state_dict().items()}
        edits = {}
        for method in ("rgd", "esd"):
            cfg = UnlearnConfig(method=method, param_set="lora-xattn", steps=2, batch=1, n_prompts=1, gen_steps=1,
                                rank=2, lr=1e-2)
            out, _clip, edit, _ = run("unlearn", model, clip, UnlearnJob(concept="circle", settings=cfg,
                                                                         retain_prompts=["a blue square"]))
            assert out is not model and out.patches and not model.patches
            assert all(math.isfinite(v) for v in edit.metrics["history"]["forget"])
            assert _finite_edit(edit) > 0
            edits[method] = (out, edit)
        out, edit = edits["esd"]
        report = audit_models(out, model, clip, ["a red circle"], ["a house", "a tree"],
                              AuditConfig(checkpoints=(1, 2), batch=1, gen_steps=1, rank=2), edit=edit)
    assert report.presence_original == pytest.approx(1.0)
    vals = [report.presence_edited] + report.presence_after + report.loss
    assert len(report.loss) == 2 and all(math.isfinite(v) for v in vals), report.to_text()
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    for k, v in model.model_state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distill_and_presence_on_an_sdxl_model(comfy, clip):
    model = sdxl_style_model(64, seed=1)
    host = ModelView(model, clip).denoiser
    with torch.enable_grad():
        quick = UnlearnConfig(method="esd", param_set="xattn", steps=1, batch=1, n_prompts=1, gen_steps=1)
        student = run("unlearn", model, clip, UnlearnJob(concept="circle", settings=quick)).edit
        cfg = DistillConfig(steps=2, erase_every=2, batch=1, n_prompts=1, gen_steps=1, rank=2)
        edit = compute_distill_unlearn(host, host.text, student, "circle", cfg, family=host.family.name, ctx=host.ctx)
    assert len(edit.metrics["history"]["distill"]) == 1 and len(edit.metrics["history"]["erase"]) == 1
    assert _finite_edit(edit) > 0
    x0 = host.latent_in(host.sample(["a red circle"], steps=1, cfg=3.0, seed=0))
    scores = presence_scores(host, host.text, ["a red circle"], x0, PresenceConfig(timesteps=(200, 600), noise_draws=1))
    assert all(math.isfinite(v) for v in scores.gain + scores.shift)

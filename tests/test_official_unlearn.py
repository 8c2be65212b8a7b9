"""`official` for unlearning: one deterministic training step of the pack against a reference written
from each official script, on the bundled tiny model's real UNet and text encoder (ComfyUI's own
classes), fed the same weights, text embeddings, latents, seed and initial optimiser state.

The references are plain torch loops over a copy of the UNet, read from:
- ESD: rohitgandikota/erasing, commit b8aeab6d4b6b613b88ad0bf219e3697c79003838:
  train-scripts/train-esd.py (train_esd: the iteration body, train_method 'xattn'),
  ldm/models/diffusion/ddim.py (DDIMSampler.make_schedule, ddim_sampling with till_T, p_sample_ddim),
  ldm/modules/diffusionmodules/util.py (make_ddim_timesteps "uniform", make_ddim_sampling_parameters).
- RGD: reds-lab/Restricted_gradient_diversity_unlearning, commit 0075ecbb74581478ee6cc0334f1e3287d3bcf1ba:
  SD/train-scripts/nsfw_RGD.py (nsfw_proposed with --truncate --surgery as SD/run-surgery.sh runs it;
  flatten_grads, project_grad_onto, apply_pcgrad_update), SD/ldm/models/diffusion/ddpm.py
  (LatentDiffusion.forward and p_losses with the SD config: ε target, logvar 0, no ELBO term).
The random draws come from the generator the pack documents (seed + 17), in each script's order.

Tolerance: the pack's ε goes through ComfyUI's model sampling (x·√(1+σ²), back by c_in, ε from the
denoised x₀), the reference calls the UNet on x_t directly, a float32 round-off of ~1e-6 relative; the
update of Adam's first step is lr·g/(|g| + 1e-8), so it agrees to that round-off except on weights whose
gradient is itself near 1e-8. Asserted: relative Frobenius distance of the whole update ≤ 1e-3 (measured
2e-5 … 7e-5), and the losses to the 6 decimals the history keeps. Run with -s for the measured values.
"""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conceptedit.editing.arch import UNET_PREFIX
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.hooks import copy_norm_inputs
from conceptedit.editing.hosts import conditioning, latent_shape
from conceptedit.editing.scope import check_scope
from conceptedit.editing.unlearn import trainer as U
from conceptedit.editing.unlearn.config import OFFICIAL
from conceptedit.tiny.model import DEFAULT_WEIGHTS

pytestmark = pytest.mark.skipif(not os.path.isfile(DEFAULT_WEIGHTS),
                                reason="tiny weights missing: bash run.sh py -m tiny.train")

TOL = 1e-3


@pytest.fixture(scope="module")
def tiny(comfy):
    from conceptedit.comfy_host.view import ModelView
    from conceptedit.tiny.comfy_model import load_tiny
    model, clip, _vae = load_tiny()
    host = ModelView(model, clip).denoiser
    return host, host.text


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _eps(unet, x, t, c):
    return unet(x, timesteps=t, context=c).float()  # an EPS model: its output is ε


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    return math.sqrt(num / sum(float(v.pow(2).sum()) for v in b.values()))


def _size(a: dict) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for v in a.values()))


def _weight_updates(edit) -> dict:
    return {k[len(UNET_PREFIX):-len(".weight")]: c.delta(dtype=torch.float32) for k, c in edit.changes.items()}


# ---- ESD: train-esd.py ---------------------------------------------------------------------------------
def _ldm_sample_till(model, c, uc, x, ddim_steps, scale, till_T, alphas_cumprod):
    """DDIMSampler.sample(S=ddim_steps, eta=0, x_T=x, unconditional_guidance_scale=scale, till_T=till_T)."""
    step = 1000 // ddim_steps                                        # make_ddim_timesteps, "uniform"
    ddim_timesteps = torch.arange(0, 1000, step) + 1
    alphas = alphas_cumprod[ddim_timesteps]                          # make_ddim_sampling_parameters
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    total_steps = len(ddim_timesteps)
    till = till_T if till_T is not None else 0
    for i, ts in enumerate(ddim_timesteps.flip(0).tolist()):       # ddim_sampling
        index = total_steps - i - 1
        t = torch.full((x.shape[0],), ts, dtype=torch.long)
        e_t_uncond, e_t = _eps(model, torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uc, c])).chunk(2)
        e_t = e_t_uncond + scale * (e_t - e_t_uncond)                 # p_sample_ddim
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        dir_xt = (1 - a_prev).sqrt() * e_t                           # sigma_t = 0 (ddim_eta 0)
        x = a_prev.sqrt() * pred_x0 + dir_xt
        if index + 1 == till:
            break
    return x


def _esd_reference(unet, ac, emb_p, emb_0, *, seed, ddim_steps, start_guidance, negative_guidance, lr, shape):
    """One iteration of train_esd(train_method='xattn'); returns (loss, {parameter name: its update})."""
    model_orig = copy.deepcopy(unet).requires_grad_(False)
    model = copy.deepcopy(unet).requires_grad_(True)
    copy_norm_inputs(model)  # ComfyUI 2024 adds residuals in place; a copy keeps the backward possible
    parameters = {name: p for name, p in model.named_parameters() if "attn2" in name}
    before = {n: p.detach().clone() for n, p in parameters.items()}
    opt = torch.optim.Adam(parameters.values(), lr=lr)
    g = torch.Generator().manual_seed(seed + 17)
    opt.zero_grad()
    t_enc = torch.randint(ddim_steps, (1,), generator=g)
    og_num = round((int(t_enc) / ddim_steps) * 1000)
    og_num_lim = round((int(t_enc + 1) / ddim_steps) * 1000)
    t_enc_ddpm = torch.randint(og_num, og_num_lim, (1,), generator=g)
    start_code = torch.randn((1, *shape), generator=g)
    with torch.no_grad():
        z = _ldm_sample_till(model, emb_p, emb_0, start_code, ddim_steps, start_guidance, int(t_enc), ac)
        e_0 = _eps(model_orig, z, t_enc_ddpm, emb_0)
        e_p = _eps(model_orig, z, t_enc_ddpm, emb_p)
    e_n = _eps(model, z, t_enc_ddpm, emb_p)
    loss = F.mse_loss(e_n, e_0 - (negative_guidance * (e_p - e_0)))
    loss.backward()
    opt.step()
    return loss.item(), {n: (p.detach() - before[n]) for n, p in parameters.items()}


def _esd_cfg(**kw):
    base = dict(method="esd", param_set="xattn", steps=1, lr=1e-3, eta=1.0, esd_cfg=3.0, esd_ddim_steps=50, seed=3,
                official="esd")
    base.update(kw)
    return U.UnlearnConfig(**base)


def test_official_esd_step_is_train_esd_py(tiny):
    host, text = tiny
    cfg = _esd_cfg()
    edit = U.compute_unlearn(host, text, "red", cfg, family="tiny")
    ac = host.alphas_cumprod().float()
    (emb_p, _), (emb_0, _) = conditioning(host, text, ["red"]), conditioning(host, text, [""])
    loss, ref = _esd_reference(host.unet(), ac, emb_p.float(), emb_0.float(), seed=cfg.seed, ddim_steps=50,
                               start_guidance=3.0, negative_guidance=1.0, lr=cfg.lr, shape=latent_shape(host))
    got = _weight_updates(edit)
    weights = {n[:-len(".weight")]: d for n, d in ref.items() if n.endswith(".weight")}
    assert set(got) == set(weights)  # every attn2 Linear weight, as a dense change
    assert all(c.kind == "delta" for c in edit.changes.values())
    assert _rel(got, weights) <= TOL
    assert edit.metrics["history"]["forget"][0] == pytest.approx(loss, abs=1e-6)
    assert edit.params["official"] == "esd" and "warnings" not in edit.metrics
    assert "train-esd.py" in edit.metrics["official_source"]
    # train-esd.py also trains the attn2 biases (to_out.0.bias); the edit holds weights only
    bias = {n: d for n, d in ref.items() if n.endswith(".bias")}
    assert bias
    share = math.sqrt(sum(float(d.pow(2).sum()) for d in bias.values()) / sum(float(d.pow(2).sum())
                                                                             for d in ref.values()))
    print(f"\nmeasured esd: pack vs reference {_rel(got, weights):.2e}; the biases' share of the script's update "
          f"{share:.3g}; loss {loss:.6f}")


def test_default_esd_step_differs_from_train_esd_py(tiny):
    """"off" trains batch 4 on the frozen model's samples on its own DDIM schedule, the target taken at
    the sample's own timestep: another update than the script's for the same seed."""
    host, text = tiny
    cfg = _esd_cfg(official="off")
    edit = U.compute_unlearn(host, text, "red", cfg, family="tiny")
    ac = host.alphas_cumprod().float()
    (emb_p, _), (emb_0, _) = conditioning(host, text, ["red"]), conditioning(host, text, [""])
    _, ref = _esd_reference(host.unet(), ac, emb_p.float(), emb_0.float(), seed=cfg.seed, ddim_steps=50,
                            start_guidance=3.0, negative_guidance=1.0, lr=cfg.lr, shape=latent_shape(host))
    weights = {n[:-len(".weight")]: d for n, d in ref.items() if n.endswith(".weight")}
    got = _weight_updates(edit)
    rel = _rel(got, weights)
    print(f"\nmeasured esd off vs official, one step: {rel:.3g}, size ratio {_size(got) / _size(weights):.3g}; "
          f"first loss off "
          f"{edit.metrics['history']['forget'][0]:.6f}")
    assert rel > 0.3


def test_ldm_ddim_schedule_and_stop_are_the_samplers():
    from conceptedit.editing.unlearn.official import esd_draw, ldm_ddim_timesteps
    ts = ldm_ddim_timesteps(1000, 50)
    assert ts[0] == 1 and ts[-1] == 981 and len(ts) == 50
    assert len(ldm_ddim_timesteps(1000, 30)) == 31  # 1000 // 30 = 33: ldm's uneven schedule, kept
    with pytest.raises(InvalidInputError, match="esd_ddim_steps"):
        ldm_ddim_timesteps(1000, 1001)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        t_enc, t, x = esd_draw(g, 50, 1000, (4, 8, 8))
        assert 20 * t_enc <= t < 20 * (t_enc + 1) and x.shape == (1, 4, 8, 8)


# ---- RGD: nsfw_RGD.py ------------------------------------------------------------------------------------
def _project_grad_onto(grad, onto):
    similarity = torch.dot(grad.flatten(), onto.flatten()) / (torch.norm(onto.flatten()) ** 2)
    if similarity.item() < 0:
        return grad - similarity * onto
    return grad


def _rgd_reference(unet, ac, data, names, *, seed, alpha, m, lr, batch_size, full=False):
    """The first iteration of nsfw_proposed(truncate=True, surgery=True). The gradients (projection and
    step) are those of the weights of `names`, the layers the pack trains (its parameter sets hold
    weights; see the docs); `full`: of every UNet parameter, as train_method 'full' of run-surgery.sh.
    Returns the forget and retain losses and the update of each weight of `names`."""
    model = copy.deepcopy(unet).requires_grad_(False)
    copy_norm_inputs(model)  # ComfyUI 2024 adds residuals in place; a copy keeps the backward possible
    named = dict(model.named_parameters())
    wanted = named if full else {n + ".weight": named[n + ".weight"] for n in names}
    params = {n: p.requires_grad_(True) for n, p in wanted.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed + 17)
    rows = torch.arange(0, min(batch_size, len(data.forget_prompts)))  # zip(forget_dl, remain_dl), batch 0

    def shared_step(x_start, c):  # LatentDiffusion.forward + p_losses
        t = torch.randint(0, 1000, (x_start.shape[0],), generator=g).long()
        noise = torch.randn(x_start.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        x_noisy = a.sqrt() * x_start + (1 - a).sqrt() * noise            # q_sample
        loss_simple = F.mse_loss(_eps(model, x_noisy, t, c), noise, reduction="none").mean([1, 2, 3])
        return loss_simple.mean()

    optimizer.zero_grad()
    forget_loss = shared_step(data.x_forget[rows], data.c_forget[rows])
    logged_forget = forget_loss.item()
    if forget_loss.item() > m:
        forget_loss = forget_loss / torch.norm(forget_loss)
    forget_loss.backward()
    ascent = [-p.grad.detach() for p in params.values()]
    optimizer.zero_grad()
    retain_loss = shared_step(data.x_retain[rows], data.c_retain[rows])
    retain_loss.backward()
    retain = [p.grad.detach() for p in params.values()]
    flat_a, flat_r = torch.cat([a.view(-1) for a in ascent]), torch.cat([r.view(-1) for r in retain])
    new_a, new_r = _project_grad_onto(flat_a, flat_r), _project_grad_onto(flat_r, flat_a)
    sizes = [p.numel() for p in params.values()]
    for p, a, r in zip(params.values(), new_a.split(sizes), new_r.split(sizes)):
        p.grad.data = (a + alpha * r).view_as(p).clone()
    optimizer.step()
    return logged_forget, retain_loss.item(), {n: params[n + ".weight"].detach() - before[n + ".weight"]
                                                for n in names}


def _rgd_cfg(**kw):
    base = dict(method="rgd", param_set="lora-xattn", steps=1, lr=1e-3, alpha=1.6, truncation=1.1, batch=3,
                n_prompts=4, gen_steps=4, seed=5, official="rgd")
    base.update(kw)
    return U.UnlearnConfig(**base)


@pytest.fixture(scope="module")
def rgd_data(tiny):
    host, text = tiny
    return U.prepare_data(host, text, "red", U.official_config(_rgd_cfg()), family="tiny")


@pytest.mark.parametrize("m", [1.1, 1e-4], ids=["below-m", "truncated"])
def test_official_rgd_step_is_nsfw_rgd_py(tiny, rgd_data, m):
    host, text = tiny
    cfg = _rgd_cfg(truncation=m)
    edit = U.compute_unlearn(host, text, "red", cfg, family="tiny", data=rgd_data)
    names = U.select_targets(dict(host.unet().named_modules()), "xattn")
    lf, lr_, ref = _rgd_reference(host.unet(), host.alphas_cumprod().float(), rgd_data, names, seed=cfg.seed,
                                  alpha=1.6, m=m, lr=cfg.lr, batch_size=3)
    got = _weight_updates(edit)
    assert set(got) == set(ref) and all(c.kind == "delta" for c in edit.changes.values())
    check_scope(edit.method, edit.params, edit.changes)  # a dense change of the lora-xattn set loads as one
    assert _rel(got, ref) <= TOL
    h = edit.metrics["history"]
    assert h["forget"][0] == pytest.approx(lf, abs=1e-6) and h["retain"][0] == pytest.approx(lr_, abs=1e-6)
    assert (lf > m) == (m < 1)
    assert any("run-surgery.sh fine-tunes every UNet parameter" in w for w in edit.metrics["warnings"])
    # what training (and projecting) every UNet parameter, run-surgery.sh's 'full', changes in the same step
    *_, full = _rgd_reference(host.unet(), host.alphas_cumprod().float(), rgd_data, names, seed=cfg.seed,
                              alpha=1.6, m=m, lr=cfg.lr, batch_size=3, full=True)
    print(f"\nmeasured rgd m={m}: pack vs reference {_rel(got, ref):.2e}; attn2 update of 'full' vs the "
          f"attn2-only step {_rel(full, ref):.3g}; forget loss {lf:.6f}, retain {lr_:.6f}")


def test_default_rgd_step_differs_from_nsfw_rgd_py(tiny, rgd_data):
    """"off" trains a LoRA on rows drawn at random (with replacement): another update."""
    host, text = tiny
    cfg = _rgd_cfg(official="off")
    edit = U.compute_unlearn(host, text, "red", cfg, family="tiny", data=rgd_data)
    assert all(c.kind == "lowrank" for c in edit.changes.values())
    names = U.select_targets(dict(host.unet().named_modules()), "xattn")
    _, _, ref = _rgd_reference(host.unet(), host.alphas_cumprod().float(), rgd_data, names, seed=cfg.seed,
                               alpha=1.6, m=1.1, lr=cfg.lr, batch_size=3)
    got = _weight_updates(edit)
    rel = _rel({k: got.get(k, torch.zeros_like(v)) for k, v in ref.items()}, ref)
    print(f"\nmeasured rgd off vs official, one step: {rel:.3g}, size ratio {_size(got) / _size(ref):.3g}; "
          f"first forget loss off "
          f"{edit.metrics['history']['forget'][0]:.6f}")
    assert rel > 0.5
    # the same dense set: what is left is the batches (random rows with replacement, not the loader's order)
    dense = _weight_updates(U.compute_unlearn(host, text, "red", _rgd_cfg(official="off", param_set="xattn"),
                                              family="tiny", data=rgd_data))
    print(f"measured rgd off on the dense set vs official, one step: {_rel(dense, ref):.3g}")
    assert _rel(dense, ref) > 0.1


def test_official_batches_are_the_loaders():
    from conceptedit.editing.unlearn.official import rgd_rows
    assert [rgd_rows(i, 7, 3).tolist() for i in range(4)] == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]


def test_official_needs_its_method_and_names_what_it_ignores():
    with pytest.raises(InvalidInputError, match="official"):
        U.UnlearnConfig(official="uce").validate()
    with pytest.raises(InvalidInputError, match="set method to esd"):
        U.UnlearnConfig(method="rgd", official="esd").validate()
    with pytest.raises(InvalidInputError, match="set method to rgd"):
        U.UnlearnConfig(method="ga", official="rgd").validate()
    with pytest.raises(InvalidInputError, match="forget_objective ascent"):
        U.UnlearnConfig(method="rgd", forget_objective="esd", official="rgd").validate()
    cfg = U.UnlearnConfig(method="esd", param_set="noxattn", batch=8, esd_xt="noised", rank=16, official="esd")
    said = U.official_warnings(cfg)
    assert len(said) == 3 and all(s.startswith("official esd ignores") for s in said)
    run = U.official_config(cfg)
    assert (run.batch, run.esd_xt, run.esd_prompt, run.rank) == (1, "sampled", "concept", 16)
    rgd = U.UnlearnConfig(method="rgd", param_set="xattn", retain_pairing="independent", official="rgd")
    said = U.official_warnings(rgd, ["a photo"])
    assert [s.split(":")[0] for s in said] == ["official rgd ignores retain_pairing='independent'",
                                               "official rgd ignores the extra retain prompts"]
    assert U.official_warnings(U.UnlearnConfig(method="esd", param_set="xattn", official="esd")) == []
    assert U.official_config(U.UnlearnConfig()) == U.UnlearnConfig()


def test_node_and_cli_take_official(comfy, monkeypatch, tmp_path):
    from conceptedit import cli
    from conceptedit.cli import common
    from conceptedit.comfy_host import jobs
    from conceptedit.nodes import nodes_unlearn
    from test_unlearn import recording_unlearn
    seen = []
    fake_unlearn = recording_unlearn(seen)

    monkeypatch.setattr(jobs, "run", fake_unlearn)
    monkeypatch.setattr(nodes_unlearn, "run", fake_unlearn)
    monkeypatch.setattr(common, "load_model", lambda *a, **k: ("MODEL", "CLIP"))
    spec = nodes_unlearn.TrainUnlearn.INPUT_TYPES()["optional"]["official"]
    assert spec[1]["options"] == list(OFFICIAL) and spec[1]["default"] == "off"
    nodes_unlearn.TrainUnlearn().execute("MODEL", "CLIP", "red", "", "esd", "xattn", 1, 1e-5, 4, 0, official="esd")
    nodes_unlearn.TrainUnlearn().execute("MODEL", "CLIP", "red", "", "rgd", "lora", 1, 1e-5, 4, 0)
    out = tmp_path / "e.safetensors"
    assert cli.main(["unlearn", "--ckpt", "tiny", "--concept", "red", "--method", "rgd", "--official", "rgd",
                     "--out", str(out)]) == 0
    assert [c.official for c in seen] == ["esd", "off", "rgd"]
    with pytest.raises(SystemExit):
        cli.main(["unlearn", "--ckpt", "tiny", "--concept", "red", "--official", "train-esd"])

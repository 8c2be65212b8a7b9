"""ConceptPrune's ``official="concept-prune"`` against a reference written from the authors' code.

The reference below follows github:ruchikachavhan/concept-prune at commit
72927d9a2b518caed4e5dddd8549d04b168ad5d7 step by step (own code, not copied):
- wanda/wanda.py `main`: one Wanda receiver for the base (reference) prompts and one for the
  target (concept) prompts; each pair, in order, generated one prompt at a time; then, per
  timestep and layer, metric = |W| · column norm, the target's row-wise descending `torch.sort`
  cut at int(skill_ratio · 4d), kept where metric_target > metric_base;
- neuron_receivers/base_receiver.py `observe_activation`: `torch.manual_seed(seed)` before each
  generation, the StableDiffusionPipeline called with its defaults;
- neuron_receivers/wanda_receiver.py `Wanda.hook_fn`: a forward hook on every ``ff.net`` GEGLU, its
  output viewed as [tokens of both CFG halves, 4d], `F.normalize(p=2, dim=1)` per token, added to
  the (timestep, layer) column norm; `update_time_layer` counts layers in call order and moves to
  the next timestep after the last layer; layer l is the l-th name of the sorted ``ff.net`` Linear
  names (the order the UNet runs them in, on SD1.5 as on the tiny model);
- utils/base_utils.py `ColumnNormCalculator.add_rows`: norm ← √(norm² + ‖rows‖²_col);
- wanda/save_union_over_time.py: Σ_t<τ masks > select_ratio · τ;
- the pipeline (diffusers' StableDiffusionPipeline, SD1.x's PNDMScheduler config: skip_prk_steps,
  steps_offset 1, "leading" spacing, set_alpha_to_one False): latents = randn in float16 on the
  device, CFG when the scale is above 1 with [negative "", prompt] in one UNet call, PNDM's
  `set_timesteps` / `step_plms` / `_get_prev_sample` (diffusers' scheduling_pndm.py; checked against
  the installed diffusers below when it is there).

It is fed the same tiny model (ComfyUI's real classes), the same text encoder and prompts as the
pack. The official code runs all 51 evaluations of every generation; the reference stops after the
first τ, whose statistics do not depend on later evaluations.

Tolerances: column norms (hence scores |W|·norm) within rtol 1e-5 / atol 1e-6 (float32: the pack sums
x²/‖x‖² by a mat-vec over batches of prompts, the reference by the √(a² + b²) recurrence one prompt at
a time); masks exactly equal, and `fragile_decisions` checks that no selection of the reference sits
within the measured difference of the two statistics, so the equality is not luck. PNDM against
diffusers: rtol 1e-5.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import random_clip, random_model

from conceptedit.editing import arch
from conceptedit.editing.concept_prune.prune import (PLMS, FFNStatistics, collect_statistics, compute_concept_prune,
                                                     official_warnings, plms_timesteps, skilled_mask)
from conceptedit.editing.concept_prune.config import OFFICIAL, PruneConfig
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.hosts import RunContext
from conceptedit.editing.prompts import build_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_WEIGHTS = os.path.join(ROOT, "tiny", "weights", "tiny_sd.safetensors")
needs_tiny = pytest.mark.skipif(not os.path.isfile(TINY_WEIGHTS), reason="tiny model weights not trained yet")
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}


# ---- the reference ---------------------------------------------------------------------------------
class RefPNDM:
    """diffusers' PNDMScheduler with SD1.x's config, as scheduling_pndm.py runs it (skip_prk_steps)."""

    def __init__(self, alphas_cumprod, num_inference_steps, steps_offset=1):
        self.alphas_cumprod = alphas_cumprod.float()
        self.final_alpha_cumprod = self.alphas_cumprod[0]  # set_alpha_to_one False
        self.n_train = len(alphas_cumprod)
        self.num_inference_steps = num_inference_steps
        step_ratio = self.n_train // num_inference_steps
        ts = [round(i * step_ratio) + steps_offset for i in range(num_inference_steps)]
        self.timesteps = list(reversed(ts[:-1] + ts[-2:-1] + ts[-1:]))
        self.ets, self.counter, self.cur_sample = [], 0, None

    def step(self, model_output, timestep, sample):
        prev_timestep = timestep - self.n_train // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + self.n_train // self.num_inference_steps
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4])
        a_t = self.alphas_cumprod[timestep]
        a_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
        self.counter += 1
        return sample_coeff * sample - (a_prev - a_t) * model_output / denom


class RefColumnNorm:
    """utils/base_utils.py ColumnNormCalculator."""

    def __init__(self):
        self.column_norms = None

    def add_rows(self, rows):
        if self.column_norms is None:
            self.column_norms = torch.norm(rows, dim=0)
        else:
            self.column_norms = torch.sqrt(self.column_norms ** 2 + torch.norm(rows, dim=0) ** 2)


class RefWanda:
    """neuron_receivers/wanda_receiver.py Wanda (hook_module 'unet'): a hook on each ff.net GEGLU."""

    def __init__(self, seed, T, n_layers):
        self.seed, self.T, self.n_layers = seed, T, n_layers
        self.activation_norm = {t: {l: RefColumnNorm() for l in range(n_layers)} for t in range(T)}
        self.timestep = self.layer = 0

    def reset_time_layer(self):
        self.timestep = self.layer = 0

    def update_time_layer(self):
        if self.layer == self.n_layers - 1:
            self.layer, self.timestep = 0, self.timestep + 1
        else:
            self.layer += 1

    def hook_fn(self, module, inputs, output):
        # the GEGLU's output, the input of ff.net.2; in eval mode the dropout between them is the identity
        save_gate = output.detach().reshape(-1, output.shape[-1]).float().cpu()
        save_gate = F.normalize(save_gate, p=2, dim=1)
        self.activation_norm[self.timestep][self.layer].add_rows(save_gate)
        self.update_time_layer()
        return output

    def observe_activation(self, pipe, prompt):
        hooks = [m.register_forward_hook(self.hook_fn) for n, m in pipe.unet_modules.items()
                 if n.endswith("ff.net.0")]
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                return pipe(prompt)
        finally:
            for h in hooks:
                h.remove()


class RefPipeline:
    """StableDiffusionPipeline.__call__ with its defaults (50 steps, guidance 7.5, negative ""), batch
    of one, the UNet through the host's ε (the tiny model is an ε model); stops after `evaluations`."""

    def __init__(self, host, text, steps, guidance, evaluations):
        self.host, self.text, self.steps, self.guidance, self.evaluations = host, text, steps, guidance, evaluations
        self.unet_modules = dict(host.modules())

    def __call__(self, prompt):
        from conceptedit.editing.hosts import latent_shape
        scheduler = RefPNDM(self.host.alphas_cumprod(), self.steps)
        cond = self.text.encode([prompt])
        cfg = self.guidance > 1
        embeds = torch.cat([self.text.encode([""]), cond]) if cfg else cond
        latents = torch.randn((1, *latent_shape(self.host)), dtype=torch.float16, device=cond.device).float()
        for i, t in enumerate(scheduler.timesteps):
            if i == self.evaluations:
                break
            x_in = torch.cat([latents] * 2) if cfg else latents
            noise_pred = self.host.eps(x_in, torch.full((x_in.shape[0],), t), embeds).float()
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + self.guidance * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents)
        return latents


def reference_norms(host, text, pairs, seed, steps, guidance, tau):
    """wanda/wanda.py's norm collection: (base receiver, target receiver, the sorted ff.net.2 names)."""
    layer_names = sorted(n for n in host.modules() if n.endswith("ff.net.2"))
    base, target = RefWanda(seed, tau, len(layer_names)), RefWanda(seed, tau, len(layer_names))
    pipe = RefPipeline(host, text, steps, guidance, tau)
    for ann_target, ann in pairs:  # (concept prompt, reference prompt) = (target, base)
        base.reset_time_layer()
        base.observe_activation(pipe, ann)
        target.reset_time_layer()
        target.observe_activation(pipe, ann_target)
    return base, target, layer_names


def reference_masks(weights, base, target, layer_names, skill_ratio, tau, select_ratio=0.0):
    """wanda/wanda.py's per-timestep masks, then save_union_over_time.py's vote."""
    masks = {}
    for l, name in enumerate(layer_names):
        abs_w = weights[name].abs().float()
        union = torch.zeros_like(abs_w)
        for t in range(tau):
            metric_base = abs_w * base.activation_norm[t][l].column_norms
            metric_target = abs_w * target.activation_norm[t][l].column_norms
            _, sorted_idx = torch.sort(metric_target, dim=1, descending=True)
            pruned_indx_target = sorted_idx[:, :int(skill_ratio * metric_target.shape[1])]
            binary_mask_target = torch.zeros_like(abs_w).scatter_(1, pruned_indx_target, 1)
            union += ((metric_target > metric_base) * binary_mask_target).float()
        masks[name] = union > select_ratio * tau
    return masks


def fragile_decisions(weights, ref, pack, layer_names, skill_ratio, tau):
    """How many selections of the reference the difference between the two statistics could flip: a
    row's top-k boundary whose score gap is below the scores' possible change |W|·|Δnorm| on both
    sides, or a chosen weight whose target − base gap is below |W|·(|Δtarget| + |Δbase|). 0 means the
    masks agree for any statistics within the measured difference, not by a hair."""
    n = 0
    for l, name in enumerate(layer_names):
        abs_w = weights[name].abs().float()
        for t in range(tau):
            rb, rt = ref["base"].activation_norm[t][l].column_norms, ref["target"].activation_norm[t][l].column_norms
            db, dt = (pack["base"][name][t] - rb).abs(), (pack["target"][name][t] - rt).abs()
            score = abs_w * rt
            k = int(skill_ratio * score.shape[1])
            vals, idx = torch.sort(score, dim=1, descending=True)
            if 0 < k < score.shape[1]:
                a, b = idx[:, k - 1:k], idx[:, k:k + 1]
                slack = abs_w.gather(1, a) * dt[a] + abs_w.gather(1, b) * dt[b]
                n += int((vals[:, k - 1:k] - vals[:, k:k + 1] <= slack).sum())
            chosen = torch.zeros_like(abs_w, dtype=torch.bool).scatter_(1, idx[:, :k], True)
            n += int(((rt - rb).abs() <= dt + db).expand_as(chosen)[chosen & (abs_w > 0)].sum())
    return n


def flat_indices(mask):
    rows, cols = mask.nonzero(as_tuple=True)
    return set((rows * mask.shape[1] + cols).tolist())


# ---- the PNDM sampler ------------------------------------------------------------------------------
def _toy_eps(x, t):
    return torch.tanh(x) + 0.1 * math.sin(t / 100.0)  # bounded, so the trajectory stays O(1)


def _alphas(n=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 50])
def test_plms_equals_the_reference_pndm(steps):
    ac = _alphas()
    ref = RefPNDM(ac, steps)
    assert plms_timesteps(steps) == ref.timesteps
    assert len(ref.timesteps) == (steps + 1 if steps > 1 else 1)
    x = y = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    ours = PLMS(ac, steps)
    for t in ref.timesteps:
        x, y = ours.step(_toy_eps(x, t), t, x), ref.step(_toy_eps(y, t), t, y)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 7, 50])
def test_plms_and_the_reference_equal_diffusers_pndm(steps):
    """The installed diffusers' own PNDMScheduler with SD1.x's scheduler config."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    sch.set_timesteps(steps)
    ac = sch.alphas_cumprod
    assert [int(t) for t in sch.timesteps] == plms_timesteps(steps) == RefPNDM(ac, steps).timesteps
    assert steps != 50 or plms_timesteps(50)[:4] == [981, 961, 961, 941]
    x = y = z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    ours, ref = PLMS(ac, steps), RefPNDM(ac, steps)
    for t in (int(t) for t in sch.timesteps):
        y = sch.step(_toy_eps(y, t), t, y).prev_sample
        x, z = ours.step(_toy_eps(x, t), t, x), ref.step(_toy_eps(z, t), t, z)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z, y, rtol=1e-5, atol=1e-6)


# ---- statistics and selection on recorded activations ---------------------------------------------
def test_statistics_on_recorded_activations_equal_the_reference_and_off_is_the_rms():
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(2, 5, 16, generator=g) * torch.rand(1, 1, 16, generator=g) for _ in range(4)]
    acts.append(torch.zeros(1, 3, 16))  # an all-zero token: F.normalize leaves it 0
    ref = RefColumnNorm()
    for a in acts:
        ref.add_rows(F.normalize(a.reshape(-1, 16), p=2, dim=1))
    official, off = FFNStatistics(["a"], 1, eps=1e-24, mean=False), FFNStatistics(["a"], 1)
    for a in acts:
        official.update("a", a)
        off.update("a", a)
    torch.testing.assert_close(official.norms()["a"][0], ref.column_norms, **STAT_TOL)
    rows = sum(a.shape[0] * a.shape[1] for a in acts)
    torch.testing.assert_close(off.norms()["a"][0] * rows ** 0.5, ref.column_norms, **STAT_TOL)
    assert not torch.allclose(off.norms()["a"][0], ref.column_norms, rtol=0.1)  # off: the RMS, √43 smaller


@pytest.mark.parametrize("ratio,select_ratio", [(0.2, 0.0), (0.05, 0.0), (0.2, 0.25), (0.1, 0.5)])
def test_mask_on_recorded_statistics_equals_the_reference(ratio, select_ratio):
    g = torch.Generator().manual_seed(3)
    tau, d, n = 6, 12, 40
    w = torch.randn(d, n, generator=g)

    class Norms:
        def __init__(self, x):
            self.activation_norm = {t: {0: type("C", (), {"column_norms": x[t]})()} for t in range(tau)}

    cn, rn = torch.rand(tau, n, generator=g), torch.rand(tau, n, generator=g)
    want = reference_masks({"l": w}, Norms(rn), Norms(cn), ["l"], ratio, tau, select_ratio)
    got = skilled_mask(w, cn, rn, ratio, tau, at_least_one=False, select_ratio=select_ratio)
    assert torch.equal(got, want["l"]) and got.any()


def test_k_is_the_official_floor_without_a_minimum_where_off_takes_one():
    w, cn, rn = torch.ones(3, 10), torch.linspace(2, 1, 10)[None], torch.zeros(1, 10)
    assert not skilled_mask(w, cn, rn, 0.05, 1, at_least_one=False).any()  # int(0.5) = 0: nothing, as official
    assert skilled_mask(w, cn, rn, 0.05, 1).sum(1).tolist() == [1, 1, 1]   # off: at least one per row


# ---- the whole procedure on the tiny model ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(comfy):
    from conceptedit.comfy_host.denoiser import ComfyDenoiser
    from conceptedit.comfy_host.text import ComfyText
    from conceptedit.tiny.comfy_model import load_tiny
    model, clip, _ = load_tiny()
    text = ComfyText(clip)
    return model, clip, ComfyDenoiser(model, text), text


@needs_tiny
def test_official_edit_on_the_tiny_model_equals_the_reference(tiny):
    _, _, den, text = tiny
    pairs = build_pairs(["triangle"], "tiny")["triangle"][:4]
    cfg = PruneConfig(skill_ratio=0.2, tau=10, steps=50, cfg=7.5, seed=0, batch_size=4, official="concept-prune")
    fam = arch.get_family("tiny")
    with torch.inference_mode():
        base, target, layer_names = reference_norms(den, text, pairs, cfg.seed, cfg.steps, cfg.cfg, cfg.tau)
        weights = {n: den.modules()[n].weight.detach().clone() for n in layer_names}
        want = reference_masks(weights, base, target, layer_names, cfg.skill_ratio, cfg.tau)
        edit = compute_concept_prune(den, fam, {"triangle": pairs}, cfg)
        stats = {name: collect_statistics(den, den.modules(), layer_names, [p[i] for p in pairs], cfg, RunContext()).norms()
                 for i, name in ((0, "target"), (1, "base"))}
        off = compute_concept_prune(den, fam, {"triangle": pairs},
                                    PruneConfig(skill_ratio=0.2, tau=10, steps=50, cfg=7.5, seed=0, batch_size=4))
    # scores: the column norms of every (step, layer), both sets
    for l, name in enumerate(layer_names):
        for t in range(cfg.tau):
            torch.testing.assert_close(stats["base"][name][t], base.activation_norm[t][l].column_norms, **STAT_TOL)
            torch.testing.assert_close(stats["target"][name][t], target.activation_norm[t][l].column_norms, **STAT_TOL)
    assert fragile_decisions(weights, {"base": base, "target": target}, stats, layer_names, cfg.skill_ratio, cfg.tau) == 0
    # masks: the exact index sets
    assert set(edit.changes) == {f"diffusion_model.{n}.weight" for n in layer_names}
    n_diff, n_union = 0, 0
    for name in layer_names:
        key = f"diffusion_model.{name}.weight"
        got = set(edit.changes[key].tensors["index"].tolist())
        assert got == flat_indices(want[name]), name
        other = set(off.changes[key].tensors["index"].tolist())
        n_diff, n_union = n_diff + len(got ^ other), n_union + len(got | other)
    assert sum(len(flat_indices(m)) for m in want.values()) == edit.metrics["pruned_weights"] > 0
    assert edit.params["official"] == "concept-prune" and off.params["official"] == "off"
    assert "72927d9a2b518caed4e5dddd8549d04b168ad5d7" in edit.metrics["official_source"]
    assert "official_source" not in off.metrics and "warnings" not in off.metrics
    assert n_diff > 0.05 * n_union  # off (ComfyUI's euler sampler) selects another mask


@needs_tiny
def test_official_statistics_do_not_depend_on_the_batch(tiny):
    _, _, den, _ = tiny
    fam = arch.get_family("tiny")
    prompts = [c for c, _ in build_pairs(["circle"], "tiny")["circle"][:3]]
    names = fam.ffn_out_modules()
    with torch.inference_mode():
        a, b = (collect_statistics(den, den.modules(), names, prompts,
                                   PruneConfig(steps=50, tau=3, batch_size=bs, official="concept-prune"), RunContext())
                for bs in (1, 3))
    for n in names:
        torch.testing.assert_close(a.norms()[n], b.norms()[n], **STAT_TOL)
        assert a.rows[n] == b.rows[n]


# ---- settings, node and command line ------------------------------------------------------------------
def test_official_value_is_validated_and_tau_counts_evaluations():
    assert OFFICIAL[0] == "off" and "concept-prune" in OFFICIAL
    with pytest.raises(InvalidInputError, match="'off', 'concept-prune'"):
        PruneConfig(official="paper").validate()
    PruneConfig(steps=50, tau=51, official="concept-prune").validate()  # 51 PNDM evaluations
    with pytest.raises(InvalidInputError, match="between 1 and steps=50"):
        PruneConfig(steps=50, tau=51).validate()
    with pytest.raises(InvalidInputError, match="51 UNet evaluations"):
        PruneConfig(steps=50, tau=52, official="concept-prune").validate()
    with pytest.raises(InvalidInputError, match="select_ratio"):
        PruneConfig(select_ratio=1.0).validate()
    assert PruneConfig(steps=50, official="concept-prune", full_trajectory=True).kept_steps == 51


def test_official_refuses_a_dit_and_warns_about_what_it_ignores():
    with pytest.raises(InvalidInputError, match="SD-style UNets only.*official='off'"):
        official_warnings(PruneConfig(official="concept-prune"), arch.get_family("flux1"))
    w = official_warnings(PruneConfig(official="concept-prune", negative="blurry", steps=20), arch.get_family("sdxl"))
    assert any("SD1.x/SD2" in x for x in w) and any("'blurry' ignored" in x for x in w)
    assert any("20 steps" in x and "50 steps" in x for x in w)
    assert official_warnings(PruneConfig(official="concept-prune"), arch.get_family("sd1")) == []

    class NoEps:
        def modules(self):
            return {}
    with pytest.raises(InvalidInputError, match="lacks eps"):
        compute_concept_prune(NoEps(), arch.get_family("tiny"), {"x": [("a x", "a")]},
                              PruneConfig(steps=2, tau=1, official="concept-prune"))


def test_node_has_the_official_input_and_records_it(comfy):
    node_cls = comfy.NODE_CLASS_MAPPINGS["ConceptEditConceptPrune"]
    spec = node_cls.INPUT_TYPES()["optional"]["official"]
    assert spec[0] == "COMBO" and spec[1]["options"] == list(OFFICIAL) and spec[1]["default"] == "off" and "72927d9" in spec[1]["tooltip"]
    clip = random_clip()
    with torch.inference_mode():
        _, edit, info = node_cls().execute(random_model(), clip, "circle", "custom", 0.1, 3, 2, 3.0, 0,
                                           pairs="a {concept} in a park | a park\n", width=64, height=64,
                                           official="concept-prune")
    assert edit.params["official"] == "concept-prune" and edit.params["tau"] == 3  # 3 evaluations of 2 steps
    assert any("2 steps, CFG 3" in w for w in edit.metrics["warnings"]) and "official" in info


def test_cli_official_flag(comfy, tmp_path, monkeypatch):
    from conceptedit.cli import common, main
    from conceptedit.editing.edit import Edit
    clip = random_clip()
    monkeypatch.setattr(common, "load_model", lambda ckpt, cpu=False: (random_model(), clip))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a {concept} in a park | a park\na red {concept} | a red thing\n")
    out = tmp_path / "circle.safetensors"
    with torch.inference_mode():
        assert main(["prune", "--ckpt", "tiny", "--concept", "circle", "--pairs", str(pairs), "--steps", "2",
                     "--tau", "3", "--skill-ratio", "0.1", "--official", "concept-prune", "--select-ratio", "0.3",
                     "--out", str(out)]) == 0
    e = Edit.load(out)
    assert e.params["official"] == "concept-prune" and e.params["select_ratio"] == 0.3 and e.params["tau"] == 3

"""The red-team audit (editing/redteam) and UCE hardening (RECE) on the tiny model and
on real ComfyUI modules: soft prompts reach the text encoder exactly where the placeholders are, the
prefix attack brings back a concept that a plain UCE edit erased (and nothing counts as a success
where nothing was erased), hardening makes the same attack fail, and the node runs inside ComfyUI."""
from __future__ import annotations

import pytest
import torch

from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.redteam import revival as R
from conceptedit.editing.redteam.runner import RedTeamConfig, RedTeamReport, concept_free
from conceptedit.editing.redteam.soft import AttackConfig, nearest_tokens
from conceptedit.editing.uce.closed_form import Operator, regenerating_embeddings
from conceptedit.editing.uce.config import UCEConfig
from conceptedit.tiny import world

PROMPTS = [p for p, _ in world.prompts_for("red", 4)]
ATTACK = AttackConfig(steps=40, samples=8, images=8, sample_steps=10, cfg=5.0, lr=0.05)


@pytest.fixture(scope="module")
def tiny(comfy):
    from conceptedit.tiny.comfy_model import load_tiny
    return load_tiny()


def _uce(model, clip, **kw):
    from conceptedit.comfy_host.jobs import UCEJob, run as run_job
    with torch.inference_mode():
        return run_job("uce", model, clip, UCEJob(settings=UCEConfig(concepts=["red"], token_window="last", **kw)))


def _red_team(model, clip, out, attacks=("prefix",), **kw):
    from conceptedit.comfy_host.audits import red_team_models
    with torch.inference_mode():
        return red_team_models(out.model if out is not None else model, model, clip, PROMPTS,
                               RedTeamConfig(attacks=attacks, attack=ATTACK, **kw),
                               edit=out.edit if out is not None else Edit("uce", "tiny", {}), concept="red")


def test_soft_tokens_replace_exactly_the_placeholders(tiny):
    """Soft vectors equal to real tokens' embeddings give the encoding of the prompt with those words;
    the nearest-token projection gives the words back."""
    from conceptedit.comfy_host.text_hooks import SoftComfyText
    _, clip, _ = tiny
    text = SoftComfyText(clip)
    with torch.inference_mode():
        ids = text.model.tokenize(["red circle"])[0]["clip_l"][0, 1:3]
        vocab = text.vocabulary()[0]
        soft = [vocab[ids].float()]
        got, _ = text.encode_soft([f"a {text.placeholder} {text.placeholder} in the style of monet"], soft)
        want, _ = text.encode_soft(["a red circle in the style of monet"], None)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert nearest_tokens(text, soft) == ids.tolist()
        assert text.decode(ids.tolist()) == "red circle"
        with pytest.raises(InvalidInputError, match="placeholder"):
            text.encode_soft(["a red circle"], soft)


def test_concept_free_twins_take_out_the_concept_words():
    assert concept_free("a picture of a red circle", "red") == "a picture of a circle"
    assert concept_free("Van Gogh painting of a bridge", "van gogh") == "painting of a bridge"
    assert concept_free("a reddish circle", "red") == "a reddish circle"  # whole words only


def test_prefix_attack_recovers_a_plain_uce_erasure_and_fails_where_nothing_was_erased(tiny):
    model, clip, _ = tiny
    out = _uce(model, clip)
    rep = _red_team(model, clip, out)
    cls = "classifier"
    assert rep.judges[0] == cls and rep.original[cls] >= 0.75
    assert rep.edited[cls] <= 0.5, rep.to_text()             # the edit erased red ...
    got = rep.attacks["prefix"]["soft"][cls]
    assert got >= rep.edited[cls] + 0.25 and rep.success("prefix"), rep.to_text()  # ... and the prefix brings it back
    assert rep.attacks["prefix"]["loss_last"] < rep.attacks["prefix"]["loss_first"]
    assert rep.attacks["prefix"]["prompt"].endswith(PROMPTS[0]) and len(rep.grid_rows) == 3
    # the same attack against no edit at all: presence stays the original's, and that is no success
    none = _red_team(model, clip, None)
    assert abs(none.edited[cls] - none.original[cls]) <= 0.125
    assert not none.success("prefix") and "fails" in none.to_text()


def test_hardening_makes_the_prefix_attack_fail(tiny):
    model, clip, _ = tiny
    hard = _uce(model, clip, harden_rounds=3)
    rounds = hard.edit.metrics["hardening"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and hard.edit.params["harden_rounds"] == 3
    assert all(r["regeneration_after"] > r["regeneration_before"] for r in rounds)
    rep = _red_team(model, clip, hard)
    plain = _red_team(model, clip, _uce(model, clip))
    cls = "classifier"
    assert rep.attacks["prefix"]["soft"][cls] <= plain.attacks["prefix"]["soft"][cls] - 0.25, (rep.to_text(), plain.to_text())
    assert not rep.success("prefix"), rep.to_text()


def test_regenerating_embedding_is_the_ridge_minimiser():
    """c' = argmin Σ_l ‖W_l(I + A)c' − W_l c‖² + λ‖c'‖²: the gradient of that objective is 0 at c'."""
    g = torch.Generator().manual_seed(0)
    d = 6
    Ws = [torch.randn(5, d, generator=g, dtype=torch.float64) for _ in range(3)]
    K = sum(W.T @ W for W in Ws)
    A = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    op = Operator(R=None, D=None, A=A, preserve_gram=K, preserve_moved=K, residual_gram=K, target_gram=K)
    C0 = torch.randn(2, d, generator=g, dtype=torch.float64)
    C1 = regenerating_embeddings(op, K, C0, 0.1)
    T = torch.eye(d, dtype=torch.float64) + A
    lam = 0.1 * float(torch.trace(T.T @ K @ T)) / d
    c = C1.clone().requires_grad_(True)
    loss = sum(((W @ T @ c.T - W @ C0.T) ** 2).sum() for W in Ws) + lam * (c ** 2).sum()
    loss.backward()
    assert float(c.grad.abs().max()) < 1e-8
    with pytest.raises(InvalidInputError, match="harden_rounds"):
        UCEConfig(concepts=["x"], harden_rounds=-1).validate()


def test_revival_restores_the_largest_pruned_weights_first():
    W = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.05, -0.3]])
    edit = Edit("concept_prune", "tiny", {"k": Change("mask", (2, 3), {"index": torch.tensor([0, 1, 3, 4])})})
    half = R.partly_restored(edit, {"k": W}, 0.5)
    assert sorted(half.changes["k"].tensors["index"].tolist()) == [0, 4]  # -5.0 and 3.0 are back
    assert R.partly_restored(edit, {"k": W}, 1.0).changes["k"].tensors["index"].numel() == 0
    assert R.partly_restored(edit, {"k": W}, 0.0).changes["k"].tensors["index"].numel() == 4
    seen = []
    rep = R.revival(edit, {"k": W}, lambda e: seen.append(e.changes["k"].tensors["index"].numel()) or {"j": 0.0},
                    fractions=(0.25, 1.0))
    assert rep.pruned_weights == 4 and rep.fractions == [0.25, 1.0] and seen == [3, 0]
    with pytest.raises(InvalidInputError, match="masks"):
        R.partly_restored(Edit("uce", "tiny", {}), {}, 0.5)


def test_config_and_report_refuse_what_cannot_be_judged():
    with pytest.raises(InvalidInputError, match="unknown attack"):
        RedTeamConfig(attacks=("jailbreak",)).validate()
    with pytest.raises(InvalidInputError, match="steps"):
        RedTeamConfig(attack=AttackConfig(steps=0)).validate()
    rep = RedTeamReport(["p"], ["j"], {"j": 0.9}, {"j": 0.1},
                        attacks={"prefix": {"soft": {"j": float("nan")}, "projected": {"j": 0.9}}})
    assert not rep.success("prefix") and rep.success("prefix", projected=True)


def test_words_that_bring_the_concept_back_count_as_a_success_in_the_verdict_and_the_rate():
    """The projected words are a prompt anyone can type: when only they bring the concept back, the
    report must not say the attack failed (ESD-x on the tiny Flux: soft 75 %, "a photo of pen" 100 %)."""
    run = lambda soft, words: {"soft": {"j": soft}, "projected": {"j": words}, "tokens": 1, "steps": 4,  # noqa: E731
                               "seconds": 0.1, "prompt": "a photo of pen", "loss_first": 1.0, "loss_last": 0.5}
    rep = RedTeamReport(["p"], ["j"], {"j": 1.0}, {"j": 0.75},
                        attacks={"inversion": run(0.75, 1.0), "prefix": run(0.75, 0.75), "embedding_match": run(1.0, 1.0)})
    assert [rep.verdict(a) for a in ("inversion", "prefix", "embedding_match")] == \
        ["SUCCEEDS as words", "fails", "SUCCEEDS (as words too)"]
    assert "inversion (1 tokens, 4 steps, 0.1 s): SUCCEEDS as words;" in rep.to_text()
    assert rep.success_rate() == 2 / 3
    d = rep.to_dict()["attacks"]
    assert (d["inversion"]["success"], d["inversion"]["success_projected"], d["inversion"]["succeeded"]) == (False, True, True)


def test_node_runs_in_comfyui_with_revival_on_a_mask_and_leaves_the_models_unchanged(comfy, tiny):
    from conceptedit.comfy_host.jobs import ConceptPruneJob, run as run_job
    from conceptedit.editing.concept_prune.config import PruneConfig
    from conceptedit.editing.prompts import TINY_DEFAULTS
    model, clip, vae = tiny
    with torch.inference_mode():
        job = ConceptPruneJob(concepts=["triangle"], preset="tiny",
                              settings=PruneConfig(**{**TINY_DEFAULTS, "steps": 4, "tau": 2}))
        pruned = run_job("concept_prune", model, clip, job)
        before = {k: v.clone() for k, v in model.model_state_dict().items()}
        node = comfy.NODE_CLASS_MAPPINGS["ConceptEditRedTeamAudit"]()
        res = node.execute(pruned.model, model, clip, "triangle", "a triangle\na red triangle", True, False, True, True,
                           3, 0, 0.05, 2, 4, 5.0, 0, edit=pruned.edit, vae=vae)
    text, grid, success = res.result
    assert "prefix" in text and "inversion" in text and "embedding_match" not in text and "revival of" in text
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and 0.0 <= success <= 1.0
    assert not model.patches and all(torch.equal(v, before[k]) for k, v in model.model_state_dict().items())
    assert res.ui.as_dict()["text"] == (text,)


def test_cli_attacks_an_edit_file_and_writes_report_and_grid(comfy, tiny, tmp_path):
    import json

    from conceptedit import cli
    model, clip, _ = tiny
    path = tmp_path / "red_uce.safetensors"
    _uce(model, clip).edit.save(path)
    report, grid = tmp_path / "rt.json", tmp_path / "rt.png"
    with torch.inference_mode():
        assert cli.main(["redteam", "--ckpt", "tiny", "--edit", str(path), "--concept", "red", "--prompt",
                         "a red circle", "--attacks", "prefix,inversion", "--steps", "3", "--samples", "2",
                         "--sample-steps", "4", "--json", str(report), "--grid", str(grid)]) == 0
    d = json.loads(report.read_text())
    assert set(d["attacks"]) == {"prefix", "inversion"} and d["judges"] == ["classifier", "model presence"]
    assert all(r["steps"] == 3 for r in d["attacks"].values()) and grid.stat().st_size > 100
    with pytest.raises(InvalidInputError, match="unknown attack"):
        cli.main(["redteam", "--ckpt", "tiny", "--edit", str(path), "--prompt", "x", "--attacks", "jailbreak"])


def test_cancel_mid_attack_stops_and_leaves_every_module_as_it_was(tiny):
    """Cancel (ComfyUI's interrupt) during an attack: Cancelled is raised, no hook stays on the UNet or
    the text encoder, every weight is the same object with the same values, and the next run works."""
    from conceptedit.comfy_host.audits import red_team_models
    from conceptedit.editing.errors import Cancelled
    from conceptedit.editing.hosts import RunContext
    model, clip, _ = tiny
    out = _uce(model, clip)
    unet = model.model.diffusion_model
    mods = list(unet.modules()) + list(clip.cond_stage_model.modules())
    params = {id(p): p.detach().clone() for m in mods for p in m.parameters(recurse=False)}
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 30  # inside the first attack's optimisation

    cfg = RedTeamConfig(attacks=("prefix",), attack=AttackConfig(steps=40, samples=2, images=2, sample_steps=4))
    with torch.inference_mode(), pytest.raises(Cancelled):
        red_team_models(out.model, model, clip, PROMPTS, cfg, edit=out.edit, concept="red",
                        ctx=RunContext(should_stop=stop))
    assert calls["n"] > 30
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mods)
    now = {id(p): p for m in mods for p in m.parameters(recurse=False)}
    assert now.keys() == params.keys() and all(torch.equal(now[k], v) for k, v in params.items())
    rep = _red_team(model, clip, out)
    assert "prefix" in rep.attacks


def test_time_limit_stops_an_attack_before_its_step_budget(tiny):
    from conceptedit.comfy_host.audits import red_team_models
    model, clip, _ = tiny
    out = _uce(model, clip)
    cfg = RedTeamConfig(attacks=("inversion",), attack=AttackConfig(steps=100_000, time_limit_s=0.5, samples=1,
                                                                    images=1, sample_steps=2))
    with torch.inference_mode():
        rep = red_team_models(out.model, model, clip, PROMPTS[:1], cfg, edit=out.edit, concept="red")
    assert 1 <= rep.attacks["inversion"]["steps"] < 100_000 and rep.attacks["inversion"]["seconds"] < 5

"""EMCID's `official="emcid"` against references written from the official EMCID code, step by step.

The references below follow github:SilentView/EMCID at commit 10a392afb502cc2ed6a781c7c56dc179defaf064:

- stage 2 (`official_stage2`): emcid/emcid_main.py, `execute_emcid_text_encoder`, the insert loop: per
  layer in order, keys and fc2 outputs by emcid/compute_ks.py `compute_ks_text_encoder` and
  emcid/compute_z.py `get_module_input_output_at_words` (the prompts tokenized with padding=True, the
  subject's last token found by experiments/causal_trace.py `find_token_range`, averaged over each
  request's prompts) on the encoder with the earlier layers' updates written into its weights;
  sources = zs − fc2 output; C₀·(1 − α)/0.5, keys and sources ·√(α/0.5) (α = edit_weight 0.5), float64;
  adj_k = solve(λC₀ + KKᵀ, K); resid = sources / (L − i); ΔW = resid adj_kᵀ; W += ΔW.float().
- C₀ (`official_c0`): emcid/layer_stats.py `layer_stats_text_encoder` over dsets/stat_dataset.py
  `TokenizedDataset` (each caption tokenized alone, truncated) batched by `length_collation`, the fc2
  inputs at the attention mask's positions (`flatten_masked_batch`) cast to float32 (mom2_dtype) and
  summed by util/runningstats.py `SecondMoment` (mom2 += aᵀa; moment = mom2 / count).
- stage 1 (`official_stage1`): emcid/compute_z.py `compute_z_text_encoder` with the SD1.4 hparams'
  objective ablate-dest and cal_text_repr_loss (simple pooled MSE): δ added to the output of
  text_model.encoder.layers.{L} at the subject's last token of every prompt, source_init the first
  prompt's clean value there, loss = MSE(ε(x_t, t, τ_δ(src)), ε(x_t, t, τ(dst))) +
  wd·‖δ‖/‖source_init‖² + pw·MSE(pooler_output_δ(src), pooler_output(dst)), Adam, then δ projected to
  ‖δ‖ ≤ clamp·‖source_init‖; the text encoder run on the tokenizer's padding=True batch with its
  attention mask, the UNet reading last_hidden_state (that many rows).

The references run ComfyUI's own CLIP classes, which take 77 positions: an official w-token batch runs
padded to 77 with the extra positions masked, and its first w rows are the w-token run's (a causal row
reads no later position). The diffusion model's ε is the pack's `ComfyDenoiser.eps` in both (ComfyUI's
UNet), x_t = √ᾱ x₀ + √(1−ᾱ) ε as DDPMScheduler.add_noise; pictures, t and noise are given to both (the
pack draws (picture, t, noise) per step from its seeded generator; the references take those draws).

Tolerances (relative Frobenius): stage 2, ΔW per layer ≤ 1e-6 against the official loop with its
float32 bookkeeping (prompt averages, zs − cur_zs, the earlier layers' ΔW written into float32 weights)
done in float64, as the pack does it (measured: 0 to 1e-7, the float32 storage of ΔW's factors), and
≤ 1e-4 against the loop as written (measured 1e-5 to 7e-5: those float32 roundings, ~4e-8 of the keys,
magnified by λC₀ + KKᵀ, whose condition number on the tiny CLIP is ~1e10); C₀ ≤ 1e-5 (float32 sums in
another order); stage 1, each step's loss and δ ≤ 1e-5, source_init ≤ 1e-6 (float32 forward and backward
through the same modules).
"""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import random_clip

from conceptedit.comfy_host.denoiser import ComfyDenoiser
from conceptedit.comfy_host.text_hooks import ComfyTextModel
from conceptedit.editing import arch
from conceptedit.editing.emcid import official as official_mod
from conceptedit.editing.emcid import compute as compute_mod
from conceptedit.editing.emcid import stage1 as stage1_mod
from conceptedit.editing.emcid import stage2 as stage2_mod
from conceptedit.editing.emcid.captions import generic_captions
from conceptedit.editing.emcid.stage2 import concept_prompts, read_keys, second_moments
from conceptedit.editing.emcid.config import OFFICIAL, EmcidConfig
from conceptedit.editing.emcid import compute_emcid
from conceptedit.editing.errors import InvalidInputError
from conceptedit.editing.training import frozen_session

ENC = "clip_l"
TINY = arch.get_family("tiny")
LAYERS = TINY.text_encoders[0].edit_layers  # (0, 1, 2): every fc2 but the last, as the official "ly-11" on SD1.4
PAIRS = [("red circle", "blue square"), ("green", "purple"), ("triangle", "star")]
TEMPLATES = ("a photo of {}", "{}", "a painting of {}")
EDIT_WEIGHT = 0.5


@pytest.fixture(scope="module")
def tiny():
    from conceptedit.tiny.comfy_model import load_tiny
    model, clip, _ = load_tiny()
    clip.cond_stage_model.to(torch.float32)  # the official code runs its text encoder in float32
    return model, clip


@pytest.fixture(scope="module")
def text(tiny):
    return ComfyTextModel(tiny[1])


@pytest.fixture(scope="module")
def c0(text):
    """One C₀ for both sides of the stage-2 comparison (the official procedure's, on 300 captions)."""
    return second_moments(text, ENC, LAYERS, EmcidConfig(official="emcid", n_captions=300))


# ---- the official code's pieces, written from it -------------------------------------------------
def find_token_range(tokenizer, token_array, substring):
    """experiments/causal_trace.py `find_token_range`: [start, end) of the tokens whose decoded text,
    spaces removed, first contains `substring` (spaces removed, lower-cased)."""
    if substring in ("", " ", "[EOS]"):
        return len(token_array) - 1, len(token_array)
    sub = substring.replace(" ", "").lower()
    toks = [tokenizer.decode([int(t)]) for t in token_array]
    whole = tokenizer.decode([int(t) for t in token_array]).replace(" ", "")
    char_loc = whole.index(sub)
    loc, start, end = 0, None, None
    for i, t in enumerate(toks):
        loc += len(t)
        if start is None and loc > char_loc:
            start = i
        if end is None and loc >= char_loc + len(sub):
            end = i + 1
            break
    return start, end


def tokenize_prompts(tokenizer, prompts):
    """compute_z.py `tokenize_prompts` (padding=True: the batch's longest prompt), and the same batch
    at ComfyUI's 77 positions with the extra ones masked: (ids77, mask77, w, ids as the tokenizer gave them)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True)
    ids, att = enc["input_ids"], enc["attention_mask"]
    w = ids.shape[1]
    ids77 = torch.full((len(prompts), 77), tokenizer.pad_token_id, dtype=torch.long)
    att77 = torch.zeros(len(prompts), 77, dtype=torch.long)
    ids77[:, :w], att77[:, :w] = ids, att
    return ids77, att77, w, ids


def lookup_indices(tokenizer, ids, subjects):
    """`range[-1] - 1` of `find_token_range` per prompt: the subject's last token."""
    return [find_token_range(tokenizer, row, s)[1] - 1 for row, s in zip(ids, subjects)]


def official_stage2(clip, sources, templates, layers, Z, C0, lam, float64=False):
    """`execute_emcid_text_encoder`'s insert loop; returns {layer: ΔW} (float64, as `upd_matrix`).

    `float64`: the same loop with its float32 bookkeeping in float64: the keys and fc2 outputs averaged
    over the prompts, zs − cur_zs, and the earlier layers' ΔW added to their fc2 outputs (by a hook)
    instead of written into float32 weights. The pack does these in float64."""
    tok = clip.tokenizer.clip_l.tokenizer
    tr = copy.deepcopy(clip.cond_stage_model.clip_l.transformer)  # its weights are written as the loop goes
    prompts = [t.format(s) for s in sources for t in templates]
    subjects = [s for s in sources for _ in templates]
    ids77, att77, _, ids = tokenize_prompts(tok, prompts)  # keys sit before any padding: its width is unread
    look = lookup_indices(tok, ids, subjects)
    rows = torch.arange(len(prompts))
    dtype = torch.float64 if float64 else torch.float32
    zs = Z.to(dtype).T  # (hidden, requests), as torch.stack(z_list, dim=1)
    deltas, hooks = {}, []
    for i, layer in enumerate(layers):
        fc2 = tr.text_model.encoder.layers[layer].mlp.fc2
        seen = {}
        handle = fc2.register_forward_hook(lambda _m, inp, out: seen.update(inp=inp[0].detach(), out=out.detach()))
        with torch.no_grad():
            tr(ids77, att77)
        handle.remove()
        # get_module_input_output_at_words: per request the mean over its prompts
        layer_ks = seen["inp"][rows, look].to(dtype).reshape(len(sources), len(templates), -1).mean(1).T
        cur_zs = seen["out"][rows, look].to(dtype).reshape(len(sources), len(templates), -1).mean(1).T
        srcs = zs - cur_zs
        cov = C0[layer].float() * (1 - EDIT_WEIGHT) / 0.5
        layer_ks, srcs = layer_ks.double() * (EDIT_WEIGHT / 0.5) ** 0.5, srcs.double() * (EDIT_WEIGHT / 0.5) ** 0.5
        adj_k = torch.linalg.solve(lam * cov.double() + layer_ks @ layer_ks.T, layer_ks)
        resid = srcs / (len(layers) - i)
        upd = resid @ adj_k.T
        if float64:
            hooks.append(fc2.register_forward_hook(
                lambda _m, inp, out, upd=upd: out + (inp[0].double() @ upd.T).to(out.dtype)))
        else:
            with torch.no_grad():
                fc2.weight[...] = fc2.weight + upd.float()
        deltas[layer] = upd
    for h in hooks:
        h.remove()
    return deltas


def official_c0(clip, captions, layer, batch_tokens=3 * 1024, batch_size=100):
    """`layer_stats_text_encoder` (mom2 over the fc2 inputs at the attention mask's positions, float32)."""
    tok = clip.tokenizer.clip_l.tokenizer
    tr = clip.cond_stage_model.clip_l.transformer
    items = [tok.encode(c, truncation=True) for c in captions]
    mom2, count = None, 0
    for a in range(0, len(items), batch_size):
        group = sorted(items[a:a + batch_size], key=lambda x: -len(x))  # length_collation
        batches, cur, width = [], [], 0
        for it in group:
            if width * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur, width = [], 0
            if not cur:
                width = len(it)
            cur.append(it)
        batches.append(cur)
        for b in batches:
            n = max(len(x) for x in b)
            ids = torch.full((len(b), 77), tok.pad_token_id, dtype=torch.long)
            att = torch.zeros(len(b), 77, dtype=torch.long)
            for j, x in enumerate(b):
                ids[j, :len(x)] = torch.tensor(x)
                att[j, :len(x)] = 1
            seen = {}
            fc2 = tr.text_model.encoder.layers[layer].mlp.fc2
            handle = fc2.register_forward_hook(lambda _m, inp, out: seen.update(inp=inp[0].detach()))
            with torch.no_grad():
                tr(ids, att)
            handle.remove()
            feats = seen["inp"][:, :n][att[:, :n].bool()].float()  # flatten_masked_batch
            mom2 = feats.T @ feats if mom2 is None else mom2 + feats.T @ feats
            count += feats.shape[0]
    return (mom2 / count).double()


@torch.enable_grad()
def official_stage1(clip, den, src, dst, templates, layer, x0, draws, hp):
    """`compute_z_text_encoder` for `len(draws)` steps; `draws`: per step (picture index per prompt, t,
    noise), those the pack drew. Returns (δ, source_init, the loss of each step)."""
    tok = clip.tokenizer.clip_l.tokenizer
    tr = clip.cond_stage_model.clip_l.transformer
    src_prompts = [p.format(src) for p in templates]
    dst_prompts = [p.format(dst) for p in templates]
    s_ids77, s_att77, s_w, s_ids = tokenize_prompts(tok, src_prompts)
    d_ids77, d_att77, d_w, _ = tokenize_prompts(tok, dst_prompts)
    look = lookup_indices(tok, s_ids, [src] * len(templates))
    bsz = len(src_prompts)
    delta = torch.zeros(tr.text_model.final_layer_norm.weight.shape[0], requires_grad=True)
    source_init = None

    def edit_output(_m, _inp, out):
        nonlocal source_init
        if source_init is None:
            source_init = out[0, look[0]].detach().clone()
        add = torch.zeros_like(out)
        add[torch.arange(bsz), look] = delta.to(out.dtype)
        return out + add

    def copy_norm_input(_m, inp):  # ComfyUI's CLIPLayer adds in place to its LayerNorms' saved inputs
        return (inp[0].clone(),) + tuple(inp[1:])

    opt = torch.optim.Adam([delta], lr=hp["lr"])
    abar = den.alphas_cumprod().float()
    with torch.no_grad():
        d_out = tr(d_ids77, d_att77)
        dest_txt_repr, dest_pooler_repr = d_out[0][:, :d_w], d_out[3]
    losses = []
    for pick, t, noise in draws:
        opt.zero_grad()
        latents = x0[pick * bsz + torch.arange(bsz)]
        a = abar[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        handles = [tr.text_model.encoder.layers[layer].register_forward_hook(edit_output)]
        handles += [m.register_forward_pre_hook(copy_norm_input) for n, m in tr.named_modules()
                    if n.endswith(("layer_norm1", "layer_norm2", "final_layer_norm"))]
        try:
            s_out = tr(s_ids77, s_att77)
        finally:
            for h in handles:
                h.remove()
        edit_source_txt_repr, edit_pooler_repr = s_out[0][:, :s_w], s_out[3]
        edit_model_pred_source = den.eps(noisy, t, edit_source_txt_repr)
        model_pred_dest = den.eps(noisy, t, dest_txt_repr)
        mse_loss = F.mse_loss(edit_model_pred_source, model_pred_dest, reduction="mean")
        reg_loss = hp["weight_decay"] * (torch.norm(delta) / torch.norm(source_init) ** 2)
        loss = mse_loss + reg_loss
        loss = loss + hp["pooled_weight"] * F.mse_loss(edit_pooler_repr, dest_pooler_repr, reduction="mean")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        max_norm = hp["max_norm"] * source_init.norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    return delta.detach(), source_init, losses


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- the switch itself ---------------------------------------------------------------------------
def test_official_values_and_refusals(text):
    assert OFFICIAL == ("off", "emcid") and EmcidConfig().official == "off"
    with pytest.raises(InvalidInputError, match="off, emcid"):
        EmcidConfig(official="memit").validate()
    cfg, used, warned = official_mod.settings(EmcidConfig(official="emcid"), TINY, text)
    # the SD1.4 json (200 steps, lr 0.2, wd 5e-4, clamp 1.5, pooled 0.01) and the scripts' λ 4000, absolute
    assert (cfg.steps, cfg.lr, cfg.weight_decay, cfg.max_norm, cfg.pooled_weight) == (200, 0.2, 5e-4, 1.5, 0.01)
    assert cfg.lam == {ENC: 4000.0} and cfg.lam_mode == "absolute" and cfg.lam_for(ENC, 256) == 4000.0
    assert (cfg.n_captions, cfg.sample_steps, cfg.sample_cfg, cfg.residual, cfg.use_stage1) == (
        100_000, 50, 7.5, "official", True)
    assert used["table"] == "sd1" and used["official"] == "emcid"
    assert warned == [("official emcid: the official code has settings for SD1.4 and SDXL only; SD1.4's are used "
                       "on this ConceptEdit tiny")]
    # the user's λ, steps and lr stay theirs; pack-only settings they changed are ignored, and said so
    mine, _, warned = official_mod.settings(EmcidConfig(official="emcid", lam=123.0, lam_mode="relative", steps=7, lr=0.05,
                                                        use_stage1=False, residual="memit", sample_steps=9,
                                                        n_captions=500), TINY, text)
    assert (mine.lam, mine.lam_mode, mine.steps, mine.lr, mine.weight_decay) == (123.0, "absolute", 7, 0.05, 5e-4)
    assert mine.use_stage1 and mine.residual == "official" and mine.sample_steps == 50 and mine.n_captions == 100_000
    said = " ".join(warned)
    for name in ("use_stage1=False", "residual='memit'", "lam_mode='relative'", "sample_steps=9", "n_captions=500"):
        assert f"ignores {name}" in said
    # the pack's defaults differ from it on the tiny model (its own table: λ 1000, 100 steps)
    off, _ = stage2_mod.resolve_defaults(EmcidConfig(), "tiny", (ENC,))
    assert off.lam_for(ENC, 256) == 1000.0 and off.steps == 100 and off.n_captions == 2000
    # SDXL: its json and λ 4000 / 10000; bigG reads the destination with CLIP-L's ids, pooled = text_embeds
    assert official_mod.official_table(("clip_l", "clip_g"))[1].lam_per_encoder == {"clip_l": 4000.0, "clip_g": 10000.0}
    assert official_mod.destination_ids_from(("clip_l", "clip_g")) == {"clip_l": "clip_l", "clip_g": "clip_l"}
    assert official_mod.pooled_projected(("clip_l", "clip_g")) == {"clip_l": False, "clip_g": True}
    assert official_mod.pooled_projected((ENC,)) == {ENC: False}
    # no official procedure for a T5 or LLM encoder, nor for a DiT
    t5_text = type("T", (), {"encoders": ("clip_l", "t5xxl"), "kinds": {"clip_l": "clip", "t5xxl": "t5"}})()
    with pytest.raises(InvalidInputError, match="t5xxl encoder has no official procedure"):
        official_mod.settings(EmcidConfig(official="emcid"), arch.get_family("flux1"), t5_text)


# ---- stage 2 --------------------------------------------------------------------------------------
def _stage2_edit(monkeypatch, text, Z, C0, cfg):
    """compute_emcid with its targets and C₀ given (stage 1 and the caption statistics are compared
    on their own below); returns (the edit, the configs second_moments was called with)."""
    seen = []
    monkeypatch.setattr(compute_mod, "optimise_targets", lambda *a, **k: ({ENC: Z}, {}))
    monkeypatch.setattr(compute_mod, "second_moments", lambda host, enc, layers, c, *a, **k: (seen.append(c), C0)[1])
    edit = compute_emcid(text, TINY, PAIRS, cfg, denoiser=object())
    return edit, seen


def _targets(text):
    """Targets Z at the last edited layer (float32 values, as the official z_list holds): each source's
    state moved by a fixed random direction of half its norm."""
    prompts = concept_prompts(text, [s for s, _ in PAIRS], TEMPLATES)
    _, H = read_keys(text, ENC, prompts, None, LAYERS[-1])
    g = torch.Generator().manual_seed(3)
    Z = H + 0.5 * H.norm(dim=1, keepdim=True) * torch.randn(H.shape, generator=g, dtype=H.dtype) / math.sqrt(H.shape[1])
    return Z.float().double()


def test_stage2_equals_official_insert_loop(monkeypatch, tiny, text, c0):
    """The same keys (tiny CLIP), C₀, targets: the pack's official ΔW per layer equals the insert loop of
    execute_emcid_text_encoder with its float32 bookkeeping done in float64 within 1e-9, and the loop as
    written (float32 averages and weight writes) within 3e-3: those float32 roundings (~4e-8 of the keys)
    are all that separates them, and λC₀ + KKᵀ (condition number ~1e10 on this CLIP, C₀'s smallest
    eigenvalues float32 noise) magnifies them to 1e-5..1e-4 of ΔW, and to 1e-3 on a CPU whose float32
    kernels round otherwise (measured 1.0e-3 on an AMD EPYC, the same every run). The pack's default on the tiny model
    differs (its λ is the tiny table's 1000, the official code's 4000); at λ 4000 it is the official loop."""
    Z = _targets(text)
    edit, seen = _stage2_edit(monkeypatch, text, Z, c0, EmcidConfig(official="emcid", templates=TEMPLATES))
    assert seen[0].official == "emcid" and seen[0].n_captions == 100_000
    assert edit.params["official"] == "emcid" and edit.metrics["stage2"][ENC]["lam_per_layer"] == [4000.0] * 3
    sources = [s for s, _ in PAIRS]
    ref64 = official_stage2(tiny[1], sources, TEMPLATES, LAYERS, Z, c0, 4000.0, float64=True)
    ref32 = official_stage2(tiny[1], sources, TEMPLATES, LAYERS, Z, c0, 4000.0)
    spec = TINY.text_encoders[0]
    ours = {i: edit.changes[spec.fc2_key(i)] for i in LAYERS}
    # the stored change is float32 factors: compare their float64 product
    exact = [_rel(ours[i].tensors["up"].double() @ ours[i].tensors["down"].double(), ref64[i]) for i in LAYERS]
    assert max(exact) < 1e-6, exact
    assert max(_rel(ours[i].delta(), ref64[i]) for i in LAYERS) < 1e-6
    written = [_rel(ours[i].delta(), ref32[i]) for i in LAYERS]
    assert max(written) < 3e-3, written
    # "off" (the pack's default on the tiny model) differs: λ 1000 writes more of each change
    off, _ = _stage2_edit(monkeypatch, text, Z, c0, EmcidConfig(templates=TEMPLATES, use_stage1=True))
    assert off.params["official"] == "off" and off.metrics["stage2"][ENC]["lam"] == 1000.0
    diffs = [_rel(off.changes[spec.fc2_key(i)].delta(), ref64[i]) for i in LAYERS]
    assert min(diffs) > 1e-2, diffs
    # at the official λ the default's stage 2 is the official one (the same residual on CLIP)
    same, _ = _stage2_edit(monkeypatch, text, Z, c0, EmcidConfig(templates=TEMPLATES, lam=4000.0))
    assert max(_rel(same.changes[spec.fc2_key(i)].delta(), ref64[i]) for i in LAYERS) < 1e-6


def test_c0_equals_official_layer_stats(tiny, text):
    """C₀ under official (float32 sums over BOS, tokens and EOS) equals layer_stats_text_encoder's on the
    same captions within 1e-5; the default's float64 sums differ from it only by float32 rounding."""
    caps = 120
    ours = second_moments(text, ENC, LAYERS, EmcidConfig(official="emcid", n_captions=caps, batch=32))
    default = second_moments(text, ENC, LAYERS, EmcidConfig(n_captions=caps, batch=32))
    for layer in LAYERS:
        ref = official_c0(tiny[1], generic_captions(caps), layer)
        assert _rel(ours[layer], ref) < 1e-5
        assert 0 < _rel(default[layer], ours[layer]) < 1e-5


# ---- stage 1 --------------------------------------------------------------------------------------
def _pack_stage1(model, clip, cfg, x0, monkeypatch):
    den = ComfyDenoiser(model, clip)
    monkeypatch.setattr(den, "sample", lambda prompts, **kw: x0[:len(prompts)].clone())
    text = ComfyTextModel(clip)
    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        deltas, h, stats = stage1_mod.optimise_delta(text, den, "red circle", "blue square", {ENC: LAYERS[-1]}, cfg)
    return den, deltas[ENC], h[ENC], stats["history"]


def _draws(x0, n_prompts, n_img, steps, seed, official, n_train):
    """The (picture, t, noise) the pack draws per step from its generator: officially the picture of
    each prompt first, then t, then the noise; the default draws no picture (it takes them all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        pick = torch.randint(0, n_img, (n_prompts,), generator=g) if official else torch.zeros(n_prompts, dtype=torch.long)
        t = torch.randint(0, n_train, (n_prompts,), generator=g)
        out.append((pick, t, torch.randn((n_prompts,) + tuple(x0.shape[1:]), generator=g)))
    return out


@pytest.mark.parametrize("which", ["tiny", "random_projection"])
def test_stage1_steps_equal_official_compute_z(monkeypatch, tiny, which):
    """Two Adam steps of stage 1 (the same pictures, t, noise, seed, fresh optimiser) under official equal
    compute_z_text_encoder's: the loss of each step, source_init and δ within 1e-5. On a CLIP whose text
    projection is not the identity (random weights) the official pooled term reads the unprojected
    pooled output; the tiny CLIP's projection is the identity. The default differs: its UNet reads the
    77-row context, h is the mean over the prompts (and its pooled output is projected)."""
    model = tiny[0]
    clip = tiny[1] if which == "tiny" else random_clip(seed=5)
    clip.cond_stage_model.to(torch.float32)
    hp = dict(lr=0.2, weight_decay=5e-4, pooled_weight=0.01, max_norm=1.5)
    n_img, steps, seed = 2, 2, 7
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(len(TEMPLATES) * n_img, 4, 32, 32, generator=g) * 0.5
    cfg = EmcidConfig(official="emcid", templates=TEMPLATES, steps=steps, images_per_prompt=n_img, seed=seed, **hp)
    den, delta, h, history = _pack_stage1(model, clip, cfg, x0, monkeypatch)
    x0_in = den.latent_in(x0).float()
    n_train = den.alphas_cumprod().shape[0]
    draws = _draws(x0_in, len(TEMPLATES), n_img, steps, seed, official=True, n_train=n_train)
    with frozen_session(model.model.diffusion_model):
        ref_delta, source_init, ref_losses = official_stage1(clip, den, "red circle", "blue square", TEMPLATES,
                                                             LAYERS[-1], x0_in, draws, hp)
    assert _rel(h, source_init) < 1e-6
    assert history == pytest.approx(ref_losses, rel=1e-5)
    assert _rel(delta, ref_delta) < 1e-5 and float(delta.norm()) > 0
    # the default, one picture per prompt so that its draws are the reference's: another loss and h
    cfg_off = dataclasses.replace(cfg, official="off", images_per_prompt=1)
    den, _, h_off, history_off = _pack_stage1(model, clip, cfg_off, x0, monkeypatch)
    draws = _draws(x0_in[:len(TEMPLATES)], len(TEMPLATES), 1, steps, seed, official=False, n_train=n_train)
    with frozen_session(model.model.diffusion_model):
        _, _, ref_losses = official_stage1(clip, den, "red circle", "blue square", TEMPLATES, LAYERS[-1],
                                           x0_in[:len(TEMPLATES)], draws, hp)
    assert abs(history_off[0] - ref_losses[0]) > 1e-3 * abs(ref_losses[0])
    assert _rel(h_off, source_init) > 1e-3


# ---- the node and the command line ------------------------------------------------------------------
def test_node_and_cli_take_official(comfy):
    from conceptedit.cli import emcid as cli_emcid
    node = comfy.NODE_CLASS_MAPPINGS["ConceptEditTextEncoderEdit"]
    kind, opts = node.INPUT_TYPES()["optional"]["official"]
    assert kind == "COMBO" and opts["options"] == list(OFFICIAL) and opts["options"][0] == "off"
    assert opts["default"] == "off" and "10a392a" in opts["tooltip"]
    import argparse
    parser = argparse.ArgumentParser()
    cli_emcid.register(parser.add_subparsers())
    args = parser.parse_args(["emcid", "--ckpt", "tiny", "--pairs", "p.csv", "--out", "e.safetensors",
                              "--official", "emcid"])
    assert args.official == "emcid"
    with pytest.raises(SystemExit):
        parser.parse_args(["emcid", "--ckpt", "tiny", "--pairs", "p.csv", "--out", "e", "--official", "x"])


def test_sdxl_official_through_the_job(comfy, monkeypatch):
    """On an SDXL-like layout (CLIP-L + bigG, vector conditioning) through the job: SDXL's official
    settings (λ 4000 / 10000 absolute), the encoders run masked with CLIP-L's pooled output unprojected
    and bigG's projected, bigG reading the destination with CLIP-L's ids, the context cut to the
    longest prompt. Two steps on a stand-in ε (the settings, not the model, are under test here)."""
    from conceptedit.comfy_host.jobs import EmcidJob, run
    from layouts import build
    calls = []
    forward = ComfyTextModel.forward

    def spy(self, encoder, ids, masked=None, projected=None):
        calls.append((encoder, ids.clone(), masked, projected))
        return forward(self, encoder, ids, masked=masked, projected=projected)

    contexts = []

    def eps(self, x, t, c, y=None):
        contexts.append(c.shape[1])
        return x * c.float().mean() + (0.0 if y is None else y.float().mean())

    real_loop, real_c0 = stage1_mod.train_loop, stage2_mod.second_moments
    monkeypatch.setattr(ComfyTextModel, "forward", spy)
    monkeypatch.setattr(ComfyDenoiser, "eps", eps)
    monkeypatch.setattr(stage1_mod, "train_loop", lambda steps, step, ctx, **kw: real_loop(2, step, ctx, **kw))
    monkeypatch.setattr(compute_mod, "second_moments", lambda host, enc, layers, c, *a, **k: real_c0(
        host, enc, layers, dataclasses.replace(c, n_captions=20), *a, **k))
    model, clip, _ = build("sdxl_like")
    cfg = EmcidConfig(official="emcid", templates=("a photo of {}", "{}"))
    edit = run("emcid", model, clip, EmcidJob(pairs=[("circle", "blue square")], settings=cfg, width=64, height=64)).edit
    assert edit.params["official"] == "emcid" and edit.params["family_defaults"]["table"] == "sdxl"
    assert edit.params["lam"] == {"clip_l": 4000.0, "clip_g": 10000.0} and edit.params["lam_mode"] == "absolute"
    assert (edit.params["steps"], edit.params["lr"], edit.params["max_norm"]) == (100, 0.1, 1.2)
    official_calls = [c for c in calls if c[2] is True]
    assert {(e, p) for e, _, _, p in official_calls} == {("clip_l", False), ("clip_g", True)}
    # the destination ("blue square", the first official call per encoder) reaches bigG as CLIP-L's ids
    first = {}
    for e, ids, _, _ in official_calls:
        first.setdefault(e, ids)
    assert torch.equal(first["clip_g"], first["clip_l"])
    # BOS + "a photo of circle" + EOS is the longest source, BOS + "a photo of blue square" + EOS the longest destination
    assert set(contexts) <= {6, 7} and 7 in contexts and 6 in contexts

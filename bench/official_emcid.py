"""How far the pack's default EMCID edit is from `official="emcid"` on the bundled tiny model, piece by piece.

    OMP_NUM_THREADS=1 bash run.sh bench official_emcid

Two concept pairs of the tiny world, the default templates, the fp16-stored tiny CLIP run as loaded.
Sizes are ‖ΔW_a − ΔW_b‖ / ‖ΔW_b‖ over all three edited fc2 layers together (b = the official edit), in
three norms: Frobenius; on generic text (‖D‖² = Σ tr(D C₀ Dᵀ), C₀ of 2000 captions in float64: the mean
square change of the fc2 output over caption tokens); on the edited concepts (‖D K‖, K their keys).
Stage-1 targets and C₀ are cached in /tmp/emcid_measure_cache (a second run takes about a minute).
"""
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _pack  # noqa: E402

_pack.load()
import torch  # noqa: E402

from conceptedit.comfy_host.denoiser import ComfyDenoiser  # noqa: E402
from conceptedit.comfy_host.text_hooks import ComfyTextModel  # noqa: E402
from conceptedit.editing import arch  # noqa: E402
from conceptedit.editing.emcid import official  # noqa: E402
from conceptedit.editing.emcid.stage1 import optimise_targets  # noqa: E402
from conceptedit.editing.emcid.stage2 import concept_prompts, read_keys, resolve_defaults, second_moments, stage2
from conceptedit.editing.emcid.config import EmcidConfig
from conceptedit.editing.training import frozen_session  # noqa: E402
from conceptedit.tiny.comfy_model import load_tiny  # noqa: E402

ENC = "clip_l"
PAIRS = [("red", "blue"), ("circle", "square")]
CACHE = "/tmp/emcid_measure_cache"

model, clip, _ = load_tiny()
text = ComfyTextModel(clip)
den = ComfyDenoiser(model, clip)
TINY = arch.get_family("tiny")
layers = TINY.text_encoders[0].edit_layers
off_cfg, _ = resolve_defaults(EmcidConfig(), "tiny", text.encoders)
on_cfg, _, _ = official.settings(EmcidConfig(official="emcid"), TINY, text)
t0 = time.time()


def targets(cfg):
    with torch.enable_grad(), frozen_session(model.model.diffusion_model):
        Z, _ = optimise_targets(text, den, PAIRS, {ENC: layers[-1]}, cfg, cache_dir=CACHE)
    return Z[ENC]


PROMPTS = concept_prompts(text, [s for s, _ in PAIRS], off_cfg.templates)
# the edited concepts' keys at each layer (unedited encoder), to weigh a ΔW difference by what it does there
KEYS = {i: read_keys(text, ENC, PROMPTS, i, layers[-1])[0] for i in layers}


def edit(Z, C0, lam):
    ups, m = stage2(text, ENC, layers, PROMPTS, Z, C0, lam, residual="official", lam_mode="absolute")
    return {i: u @ d for i, u, d in ups}, m


def rel(a, b):
    """(Frobenius, on generic text: sqrt tr(D C0 Dᵀ) with C0 of 2000 captions in float64, on the edited
    concepts' keys: ‖D K‖), each relative to the same norm of b."""
    def norms(w):
        f = sum(float(x.norm() ** 2) for x in w.values()) ** 0.5
        g = sum(float(torch.trace(x @ C0_off[i] @ x.T)) for i, x in w.items()) ** 0.5
        k = sum(float((x @ KEYS[i].T).norm() ** 2) for i, x in w.items()) ** 0.5
        return f, g, k
    d = norms({i: a[i] - b[i] for i in a})
    n = norms(b)
    return [round(x / y, 4) for x, y in zip(d, n)]


C0_off = second_moments(text, ENC, layers, off_cfg, cache_dir=CACHE)                 # 2000 captions, float64
C0_on = second_moments(text, ENC, layers, on_cfg, cache_dir=CACHE)                   # 100k captions, float32
C0_2000_f32 = second_moments(text, ENC, layers, dataclasses.replace(on_cfg, n_captions=2000), cache_dir=CACHE)
print("C0 done", round(time.time() - t0), "s", flush=True)
Z_off = targets(off_cfg)                                                # 100 steps, 20-step CFG 5 pictures
Z_on = targets(on_cfg)                                                  # 200 steps, 50-step CFG 7.5 pictures
Z_on_hp_off = targets(dataclasses.replace(on_cfg, steps=off_cfg.steps, sample_steps=off_cfg.sample_steps,
                                          sample_cfg=off_cfg.sample_cfg))  # official text path, the default's numbers
Z_off_seed1 = targets(dataclasses.replace(off_cfg, seed=1))
Z_on_seed1 = targets(dataclasses.replace(on_cfg, seed=1))
print("stage 1 done", round(time.time() - t0), "s", flush=True)

lam_off = off_cfg.lam_for(ENC, 256)
W_on, m_on = edit(Z_on, C0_on, 4000.0)
W_off, m_off = edit(Z_off, C0_off, lam_off)
out = {
    "lambda": {"default": lam_off, "official": 4000.0},
    "total: default vs official": rel(W_off, W_on),
    "noise floor: official seed 1 vs seed 0": rel(edit(Z_on_seed1, C0_on, 4000.0)[0], W_on),
    "noise floor: default seed 1 vs seed 0": rel(edit(Z_off_seed1, C0_off, lam_off)[0], W_off),
    "lambda alone (1000 vs 4000)": rel(edit(Z_on, C0_on, lam_off)[0], W_on),
    "C0 alone (2000 captions float64 vs 100k float32)": rel(edit(Z_on, C0_off, 4000.0)[0], W_on),
    "C0 float64 vs float32 sums (2000 captions)": rel(edit(Z_on, C0_off, 4000.0)[0], edit(Z_on, C0_2000_f32, 4000.0)[0]),
    "C0 2000 vs 100k captions (float32)": rel(edit(Z_on, C0_2000_f32, 4000.0)[0], W_on),
    "stage-1 targets alone (default vs official stage 1)": rel(edit(Z_off, C0_on, 4000.0)[0], W_on),
    "stage-1 text path alone (77 rows, mean h vs official, default steps and pictures)":
        rel(edit(Z_off, C0_on, 4000.0)[0], edit(Z_on_hp_off, C0_on, 4000.0)[0]),
    "stage-1 numbers alone (100 steps, 20-step CFG 5 pictures vs 200, 50-step CFG 7.5)":
        rel(edit(Z_on_hp_off, C0_on, 4000.0)[0], W_on),
    "Z: |Z_off - Z_on| / |Z_on|": round(float((Z_off - Z_on).norm() / Z_on.norm()), 4),
    "smallest eigenvalues of C0 (100k, float32), layer 0..2": [
        [float(f"{v:.3g}") for v in torch.linalg.eigvalsh(C0_on[i])[:2].tolist()] for i in layers],
    "largest eigenvalue of C0 (100k, float32), layer 0..2": [
        float(f"{torch.linalg.eigvalsh(C0_on[i])[-1].item():.4g}") for i in layers],
    "smallest eigenvalues of C0 (2000, float64), layer 0..2": [
        [float(f"{v:.3g}") for v in torch.linalg.eigvalsh(C0_off[i])[:2].tolist()] for i in layers],
    "reach per layer official": [round(r, 3) for r in m_on["reach_per_layer"]],
    "reach per layer default": [round(r, 3) for r in m_off["reach_per_layer"]],
    "seconds": round(time.time() - t0),
}
print(json.dumps(out, indent=1))

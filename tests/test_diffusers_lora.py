"""LoRA files of editing/export/lora.py read by diffusers itself: real `StableDiffusionPipeline` /
`StableDiffusionXLPipeline` objects (built from configs: the SD1.x and SDXL block structure at small
widths, random weights, nothing downloaded) `load_lora_weights` the exported file and `fuse_lora` it;
then exactly the weights the edit changes have moved, each by the edit's ΔW (relative error ≤ 1e-3
with the default float16 file), in the UNet and in the text encoder(s).

The edits are synthetic Changes of each method's key scope (`editing.scope`, checked): UCE (attn2
to_k/to_v), EMCID (text-encoder fc2, both SDXL encoders), unlearning (parameter set 'lora': every
Linear of the transformer blocks, LoRA slots as lowrank, full slots as dense deltas). They carry the
table family ("sd1"/"sdxl"), as an edit of a real checkpoint does: the file's names depend only on the
block structure, which these pipelines share with SD1.5/SDXL. Pruning masks: diffusers refuses a file
with `.diff` modules; `apply_to_diffusers` is the route, checked here to be exact and undoable."""
import pytest
import torch

from conceptedit.editing import arch
from conceptedit.editing.edit import Change, Edit
from conceptedit.editing.export.diffusers import apply_to_diffusers, pipeline_modules
from conceptedit.editing.export.lora import LoraExportConfig, edit_to_lora

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (requirements-dev.txt)")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft", reason="peft is not installed: diffusers' load_lora_weights needs it (requirements-dev.txt)")

TOL = 1e-3

# The real block structures (tests/test_diffusers_apply.py has the real widths), small widths here.
SD1_UNET = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=8, sample_size=8)
SDXL_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                 sample_size=8, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8)
# layer counts of CLIP-L (12) and OpenCLIP-G (32), so EMCID's default layers of the tables exist
TEXT = {"sd1": [dict(hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=2)],
        "sdxl": [dict(hidden_size=16, intermediate_size=32, num_hidden_layers=12, num_attention_heads=2),
                 dict(hidden_size=16, intermediate_size=32, num_hidden_layers=32, num_attention_heads=2,
                      projection_dim=16)]}


pytestmark = pytest.mark.usefixtures("one_thread")


class Pipe:
    """A real diffusers pipeline of one family's block structure, with its original weights kept."""

    def __init__(self, family: str):
        torch.manual_seed(0)
        self.fam = arch.get_family(family)
        te = [transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT[family][0]))]
        if family == "sd1":
            self.pipe = diffusers.StableDiffusionPipeline(
                vae=None, text_encoder=te[0], tokenizer=None, unet=diffusers.UNet2DConditionModel(**SD1_UNET),
                scheduler=diffusers.EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        else:
            te.append(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT[family][1])))
            self.pipe = diffusers.StableDiffusionXLPipeline(
                vae=None, text_encoder=te[0], text_encoder_2=te[1], tokenizer=None, tokenizer_2=None,
                unet=diffusers.UNet2DConditionModel(**SDXL_UNET), scheduler=diffusers.EulerDiscreteScheduler())
        self.mods = pipeline_modules(self.pipe)
        self.originals = self.weights()

    def weights(self) -> dict[tuple[str, str], torch.Tensor]:
        return {(c, k): v.detach().clone() for c, m in self.mods.items() for k, v in m.state_dict().items()}

    def where(self, key: str) -> tuple[str, str]:
        """(component, parameter name) of a ComfyUI key in this pipeline."""
        component, name = self.fam.to_diffusers(key).split(".", 1)
        if (component, name) not in self.originals and name.startswith("text_model."):
            name = name[len("text_model."):]  # transformers 5's CLIPTextModel has no text_model level
        assert (component, name) in self.originals, (key, component, name)
        return component, name

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.originals[self.where(key)].shape)

    def reset(self) -> None:
        self.pipe.unload_lora_weights()
        for c, m in self.mods.items():
            m.load_state_dict({k: v for (cc, k), v in self.originals.items() if cc == c})


_PIPES: dict[str, Pipe] = {}


@pytest.fixture(params=["sd1", "sdxl"])
def pipe(request):
    p = _PIPES.get(request.param) or _PIPES.setdefault(request.param, Pipe(request.param))
    yield p
    p.reset()


def _lowrank(shape, rank, g, scale=0.1):
    return Change("lowrank", shape, {"up": torch.randn(shape[0], rank, generator=g) * scale,
                                     "down": torch.randn(rank, shape[1], generator=g) * scale})


def _edit(method: str, p: Pipe) -> Edit:
    """A synthetic edit of `method`'s key scope for this pipeline's shapes."""
    fam, g = p.fam, torch.Generator().manual_seed(7)
    changes, params = {}, {}
    # SD1: every block; SDXL (70 blocks): a spread over its input, middle and output blocks, to stay quick
    step = 1 if fam.name == "sd1" else 5
    if method == "uce":  # cross-attention K/V; ranks 1..3 (a dense UCE edit's SVD ranks differ per key too)
        for i, k in enumerate(fam.attn2_kv_keys()[::step]):
            changes[k] = _lowrank(p.shape(k), 1 + i % 3, g)
    elif method == "emcid":  # the table's default fc2 layers of every text encoder
        for te in fam.text_encoders:
            for i in te.edit_layers:
                changes[te.fc2_key(i)] = _lowrank(p.shape(te.fc2_key(i)), 1 + i % 2, g)
    else:  # unlearning, parameter set 'lora': every Linear of a few transformer blocks
        params = {"param_set": "lora"}
        subs = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
        for b in fam.blocks[::3 * step]:
            for j, sub in enumerate(subs):
                k = f"{arch.UNET_PREFIX}{b.ldm}.{sub}.weight"
                s = p.shape(k)
                changes[k] = _lowrank(s, 4, g) if j % 2 else \
                    Change("delta", s, {"delta": torch.randn(s, generator=g) * 0.01})
    edit = Edit(method if method != "unlearn" else "unlearn-rgd", fam.name, changes, params=params)
    edit.check_scope()
    return edit


def _fused_errors(p: Pipe, edit: Edit) -> dict[str, float]:
    """After load + fuse: exactly the edit's weights moved; their relative error against ΔW per key."""
    now = p.weights()
    moved = {k for k, v in now.items() if not torch.equal(v, p.originals[k])}
    where = {key: p.where(key) for key in edit.changes}
    assert moved == set(where.values()), (sorted(moved - set(where.values()))[:3], sorted(set(where.values()) - moved)[:3])
    errs = {}
    for key, (c, n) in where.items():
        want = edit.changes[key].delta(dtype=torch.float64)
        got = now[(c, n)].double() - p.originals[(c, n)].double()
        errs[key] = float((got - want).norm() / want.norm())
    return errs


def _load_and_fuse(p: Pipe, sd: dict) -> None:
    p.pipe.load_lora_weights(dict(sd))
    p.pipe.fuse_lora()
    p.pipe.unload_lora_weights()  # the documented way to keep the fused weights and drop the PEFT layers


# diffusers names of a few ComfyUI keys, written out (not from the tables) so the test does not take
# the table's word for where a block lives
SPOT = {"sd1": {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
                "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight":
                ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight"),
                "clip_l.transformer.text_model.encoder.layers.10.mlp.fc2.weight":
                ("text_encoder", "encoder.layers.10.mlp.fc2.weight")},
        "sdxl": {"diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight":
                 ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"),
                 "diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_v.weight":
                 ("unet", "mid_block.attentions.0.transformer_blocks.9.attn2.to_v.weight"),
                 "diffusion_model.output_blocks.5.1.transformer_blocks.1.attn2.to_k.weight":
                 ("unet", "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k.weight"),
                 "clip_g.transformer.text_model.encoder.layers.30.mlp.fc2.weight":
                 ("text_encoder_2", "encoder.layers.30.mlp.fc2.weight")}}


@pytest.mark.parametrize("method", ["uce", "emcid", "unlearn"])
def test_diffusers_load_and_fuse_reproduce_the_edit(pipe, method):
    edit = _edit(method, pipe)
    # dense deltas (unlearning's full slots) by SVD to 1e-4; the float16 file adds ~3e-4
    sd, rep = edit_to_lora(edit, LoraExportConfig(max_rel_error=1e-4))
    assert rep["diff_modules"] == 0 and rep["max_rel_error"] <= 1e-4
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_te"))
               for k in sd), "SD1/SDXL transformer-block modules are named diffusers-style"
    _load_and_fuse(pipe, sd)
    errs = _fused_errors(pipe, edit)
    assert max(errs.values()) <= TOL, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    assert len({float(v) for k, v in sd.items() if k.endswith(".alpha")}) == 1  # one alpha: see lora.py
    components = {pipe.where(k)[0] for k in edit.changes}
    want = {"uce": {"unet"}, "unlearn": {"unet"},
            "emcid": {"text_encoder"} if pipe.fam.name == "sd1" else {"text_encoder", "text_encoder_2"}}[method]
    assert components == want
    for key, (component, name) in SPOT[pipe.fam.name].items():
        # transformers 5 dropped CLIPTextModel's text_model level (not CLIPTextModelWithProjection's)
        assert pipe.where(key) in ((component, name), (component, "text_model." + name))
    if method == "uce":
        ranks = {v["rank"] for v in rep["per_key"].values()}
        assert ranks == {1, 2, 3}  # mixed ranks: per-module alphas would load some attn2 modules at 2x or 3x


@pytest.mark.parametrize("pipe", ["sd1"], indirect=True)
def test_a_file_mixing_ranks_and_module_kinds_keeps_each_scale(pipe):
    # UCE (attn2, rank 1..3) and EMCID (fc2, rank 1..2) stacked as one file, as editing.edit.combine makes it
    uce, emcid = _edit("uce", pipe), _edit("emcid", pipe)
    edit = Edit("uce+emcid", pipe.fam.name, {**uce.changes, **emcid.changes})
    edit.check_scope()
    sd, _ = edit_to_lora(edit)
    _load_and_fuse(pipe, sd)
    assert max(_fused_errors(pipe, edit).values()) <= TOL


def test_ldm_named_files_sdxl_maps_them_sd1_refuses(pipe):
    """UNet weights outside the transformer blocks (unlearning's 'noxattn' set: resnets, proj_in) have no
    diffusers name in the tables: the whole file is then LDM-named. diffusers' SDXL loader maps such a
    file by its UNet config (a file mixing both styles it would silently drop the LDM half of); its
    SD1 loader has no such map and refuses the file before changing anything."""
    g = torch.Generator().manual_seed(3)
    first = "input_blocks.1" if pipe.fam.name == "sd1" else "input_blocks.4"  # SDXL's first level has no attention
    keys = [f"diffusion_model.{first}.0.in_layers.2.weight", f"diffusion_model.{first}.0.emb_layers.1.weight",
            f"diffusion_model.{first}.1.proj_in.weight", f"diffusion_model.{first}.1.transformer_blocks.0.attn1.to_q.weight"]
    names = {"sd1": ["down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight",
                     "down_blocks.0.attentions.0.proj_in.weight",
                     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
             "sdxl": ["down_blocks.1.resnets.0.conv1.weight", "down_blocks.1.resnets.0.time_emb_proj.weight",
                      "down_blocks.1.attentions.0.proj_in.weight",
                      "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]}[pipe.fam.name]
    shapes = {k: tuple(pipe.originals[("unet", n)].shape) for k, n in zip(keys, names)}
    edit = Edit("unlearn-esd", pipe.fam.name, {k: Change("delta", s, {"delta": torch.randn(s, generator=g) * 0.01})
                                               for k, s in shapes.items()}, params={"param_set": "noxattn"})
    edit.check_scope()
    sd, rep = edit_to_lora(edit, LoraExportConfig(max_rel_error=1e-4))
    assert {k.split(".")[0] for k in sd} == {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                                            for k in keys}
    if pipe.fam.name == "sd1":
        with pytest.raises(ValueError, match="not found in the base model"):  # peft: NoMatchingPeftModuleError
            pipe.pipe.load_lora_weights(dict(sd))
        assert all(torch.equal(v, pipe.originals[k]) for k, v in pipe.weights().items())
        return
    _load_and_fuse(pipe, sd)
    now = pipe.weights()
    assert {k for k, v in now.items() if not torch.equal(v, pipe.originals[k])} == {("unet", n) for n in names}
    for k, n in zip(keys, names):
        want = edit.changes[k].delta(dtype=torch.float64)
        err = float(((now[("unet", n)].double() - pipe.originals[("unet", n)].double()) - want).norm() / want.norm())
        assert err <= TOL, (k, err)


def test_pruning_masks_diffusers_refuses_diff_apply_to_diffusers_is_exact(pipe):
    """A mask's LoRA form is a full `.diff` module (−W⊙M is sparse and full-rank); diffusers' kohya
    loader refuses any file holding one. `apply_to_diffusers` applies the mask itself, exactly."""
    fam = pipe.fam
    keys = fam.ffn_out_keys()[::4]
    changes = {}
    for i, k in enumerate(keys):
        n = torch.Size(pipe.shape(k)).numel()
        changes[k] = Change("mask", pipe.shape(k), {"index": torch.arange(i % 3, n, 3)})
    edit = Edit("concept_prune", fam.name, changes)
    edit.check_scope()
    base = {k: pipe.originals[pipe.where(k)] for k in keys}
    sd, rep = edit_to_lora(edit, base=base)
    assert rep["diff_modules"] == len(keys) and all(k.endswith(".diff") for k in sd)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        pipe.pipe.load_lora_weights(dict(sd))
    assert all(torch.equal(v, pipe.originals[k]) for k, v in pipe.weights().items())

    handle = apply_to_diffusers(pipe.pipe, edit)
    now = pipe.weights()
    moved = {k for k, v in now.items() if not torch.equal(v, pipe.originals[k])}
    assert moved == {pipe.where(k) for k in keys}
    for k, change in changes.items():
        w0, w1 = pipe.originals[pipe.where(k)], now[pipe.where(k)]
        m = change.mask()
        assert torch.all(w1[m] == 0) and torch.equal(w1[~m], w0[~m])  # pruned exactly, the rest bit-identical
    handle.undo()
    assert all(torch.equal(v, pipe.originals[k]) for k, v in pipe.weights().items())

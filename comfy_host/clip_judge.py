"""The erasure benchmark's zero-shot CLIP judge: concept accuracy read by a CLIP vision model.

Each picture is labelled with the option whose text is nearest its image embedding (cosine), the
options being the erased concepts, the kept concepts and a neutral "a photo": concept accuracy is
then the share of a class's pictures labelled as that class (the runner's label metrics). The
image tower is a CLIP vision file from ComfyUI's ``clip_vision`` folder, loaded as ComfyUI's
CLIPVisionLoader loads it; the text tower is the checkpoint's own CLIP, paired with the image tower
where the two are one CLIP (SDXL's CLIP-G with clip_vision_g), the same pairing and cosine scoring as
the debias loop's judge (`paired_text_embeddings` below, `editing.uce.debias.similarity_judge`).

`register_clip_judge()` puts the judge in the benchmark's registry under ``clip`` in place of the
library's stand-in (the library does not import ComfyUI); settings come from ``options["clip"]``.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..editing.benchmark.judges import CLIP_HELP, Judge, JudgeContext, register_judge
from ..editing.errors import InvalidInputError
from ..editing.uce.debias import similarity_judge

FOLDER = "clip_vision"
EXTENSIONS = (".safetensors", ".sft")  # nothing is unpickled
NEUTRAL_LABEL = "(neutral)"



def paired_text_embeddings(clip):
    """`prompts -> [K, e]`: the CLIP's pooled, projected text embedding (what zero-shot CLIP compares with
    an image embedding). Refused when the tower has no real projection: ComfyUI drops SD1.x's
    (its checkpoints carry none; an identity stands in), so SD1.x text cannot be compared with a CLIP
    vision model; SDXL's CLIP-G keeps its own, which pairs with clip_vision_g."""
    if clip is None:
        raise InvalidInputError("connect the CLIP: its text tower scores the options for the CLIP vision judge")
    pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)[1]
    if pooled is None:
        raise InvalidInputError("this CLIP gives no pooled text embedding to compare with a CLIP vision model; "
                                "disconnect clip_vision (the model then judges by presence)")
    width = pooled.shape[-1]
    real = [m for n, m in clip.cond_stage_model.named_modules() if n.endswith("text_projection")
            and getattr(m, "weight", None) is not None and m.weight.shape[0] == width
            and not torch.equal(m.weight.float().cpu(), torch.eye(*m.weight.shape))]
    if not real:
        raise InvalidInputError("this checkpoint's text encoder has no CLIP text projection (ComfyUI drops SD1.x's), "
                                "so its text cannot be scored against a CLIP vision model: disconnect clip_vision "
                                "(the model then judges by presence) or use a model whose text tower pairs with it "
                                "(SDXL's CLIP-G with clip_vision_g)")

    def encode(prompts):
        return torch.cat([clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)[1] for p in prompts]).float()

    return encode

@dataclass(frozen=True)
class ClipJudgeSettings:
    file: str = ""                       # a file name in ComfyUI's clip_vision folder (or a path to one)
    concepts: tuple[str, ...] = ()       # the erased concepts
    kept: tuple[str, ...] = ()           # the concepts the edit must keep
    template: str = "a photo of {}"      # the option text of a concept
    neutral: str = "a photo"             # the option matching neither ("" for none)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ClipJudgeSettings:
        opts = dict(options or {})
        unknown = sorted(set(opts) - {"file", "concepts", "kept", "template", "neutral"})
        if unknown:
            raise InvalidInputError(f"unknown clip judge setting(s) {unknown}; it takes file, concepts, kept, "
                                    "template and neutral")

        def words(v) -> tuple[str, ...]:
            items = v.split(",") if isinstance(v, str) else (v or ())
            return tuple(dict.fromkeys(str(w).strip() for w in items if str(w).strip()))
        d = cls()
        return cls(str(opts.get("file", d.file) or "").strip(), words(opts.get("concepts")), words(opts.get("kept")),
                   str(opts.get("template", d.template)), str(opts.get("neutral", d.neutral)).strip()).validate()

    def validate(self) -> ClipJudgeSettings:
        if not self.concepts:
            raise InvalidInputError("the clip judge needs the erased concepts to tell apart: name them in its "
                                    "concepts setting (e.g. --judge-option clip.concepts=\"Van Gogh\")")
        lower = [c.lower() for c in self.labels]
        if len(set(lower)) != len(lower):
            raise InvalidInputError(f"a concept is named twice (erased: {list(self.concepts)}, kept: "
                                    f"{list(self.kept)}); name each once")
        if self.template.count("{}") != 1:
            raise InvalidInputError(f"the clip judge's template {self.template!r} needs one {{}} where the concept "
                                    "goes")
        return self

    @property
    def labels(self) -> list[str]:
        """The labels a picture can get, in the order of `texts`."""
        return [*self.concepts, *self.kept] + ([NEUTRAL_LABEL] if self.neutral else [])

    @property
    def texts(self) -> list[str]:
        concepts = [self.template.format(c) for c in (*self.concepts, *self.kept)]
        return concepts + ([self.neutral] if self.neutral else [])


def clip_vision_path(name: str) -> str:
    """The CLIP vision file `name` in ComfyUI's clip_vision folder(s), or `name` itself when it is a path."""
    import folder_paths
    folders = folder_paths.get_folder_paths(FOLDER) if FOLDER in folder_paths.folder_names_and_paths else []
    where = " or ".join(folders) or f"ComfyUI's models/{FOLDER} folder"
    kinds = " or ".join(EXTENSIONS)
    if not name:
        have = [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(EXTENSIONS)] if folders else []
        raise InvalidInputError(f"name the clip judge's CLIP vision file (a {kinds} file in {where}"
                                + (f"; there: {', '.join(have)}" if have else "") + ")")
    path = name if os.path.isfile(name) else folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise InvalidInputError(f"no CLIP vision file {name!r} in {where}: put the CLIP vision model there as a "
                                f"{kinds} file (for SDXL: clip_vision_g.safetensors, which pairs with its CLIP-G)")
    if not path.lower().endswith(EXTENSIONS):
        raise InvalidInputError(f"{path}: the clip judge reads {kinds} files only (nothing is unpickled); convert it "
                                "to safetensors")
    return path


def load_clip_vision(path: str):
    """ComfyUI's CLIP_VISION of the file, as its CLIPVisionLoader loads it."""
    import comfy.clip_vision
    cv = comfy.clip_vision.load(path)
    if cv is None:
        raise InvalidInputError(f"{path}: not a CLIP vision model ComfyUI recognises (ViT-L/H/bigG, SigLIP); put a "
                                f"CLIP vision .safetensors file in the {FOLDER} folder")
    return cv


def file_identity(path: str) -> str:
    """Size and a hash of a safetensors file's header (every tensor's name, dtype, shape and offset): a
    replaced file under the same name does not reuse the other's judgements, without reading its weights."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(min(n, 100_000_000))
    return f"{os.path.getsize(path)}:{hashlib.sha256(head + header).hexdigest()[:16]}"


class ClipJudge(Judge):
    """Labels each decoded picture with its nearest option; see the module's docstring."""

    name = "clip"
    reads = "own"

    def __init__(self, settings: ClipJudgeSettings, encode_images: Callable[[torch.Tensor], torch.Tensor],
                 encode_texts: Callable[[list[str]], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                 file_id: str = ""):
        self.settings, self._decode, self.file_id = settings, decode, file_id
        texts = settings.texts
        table = dict(zip(texts, encode_texts(texts)))  # every chunk compares with the same few texts: encode once
        self._score = similarity_judge(encode_images, lambda prompts: torch.stack([table[p] for p in prompts]), "{}")

    def identity(self) -> dict:
        s = self.settings
        return {"name": self.name, "file": os.path.basename(s.file), "file_id": self.file_id, "texts": s.texts,
                "labels": s.labels}

    @torch.no_grad()
    def judge(self, x, cases):
        pictures = self._decode(x)
        if pictures.ndim != 4 or pictures.shape[1] != 3:
            raise InvalidInputError(f"the clip judge reads RGB pictures [B, 3, H, W]; the decoder gave "
                                    f"{tuple(pictures.shape)}")
        # ComfyUI's IMAGE layout, what encode_image takes: [B, H, W, 3] in [0, 1]
        image = ((pictures.float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        scores = self._score(image, self.settings.texts, "")
        labels = self.settings.labels
        if scores.shape[0] != len(cases):
            raise InvalidInputError(f"the clip judge scored {scores.shape[0]} pictures for {len(cases)} prompts")
        return [{"labels": {"clip": labels[int(row.argmax())]},
                 "similarity": {lab: round(float(v), 6) for lab, v in zip(labels, row)}} for row in scores]


def build_clip_judge(ctx: JudgeContext) -> ClipJudge:
    settings = ClipJudgeSettings.from_options((ctx.options or {}).get("clip"))
    if ctx.decode is None:
        raise InvalidInputError("the clip judge looks at the decoded pictures and the host gave no decoder: give the "
                                "benchmark the checkpoint's VAE")
    text = ctx.reference_text if ctx.reference_text is not None else ctx.text
    clip = getattr(text, "clip", None)
    if clip is None:
        raise InvalidInputError("the clip judge scores with the checkpoint's text tower and the host gave no CLIP")
    try:
        encode_texts = paired_text_embeddings(clip)
    except InvalidInputError:
        raise InvalidInputError("the clip judge compares pictures with the checkpoint's own text tower, and this "
                                "CLIP gives no projected text embedding that pairs with a CLIP vision model (ComfyUI "
                                "drops SD1.x's text projection; SDXL's CLIP-G pairs with clip_vision_g): use the "
                                "presence or nudenet judge on this model") from None
    path = clip_vision_path(settings.file)
    cv = load_clip_vision(path)
    return ClipJudge(settings, lambda image: cv.encode_image(image).image_embeds, encode_texts, ctx.decode,
                     file_identity(path))


def register_clip_judge() -> None:
    """Put the ComfyUI-side clip judge in the benchmark's registry (idempotent)."""
    register_judge("clip", CLIP_HELP, build_clip_judge)


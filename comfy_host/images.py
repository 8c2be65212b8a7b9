"""Pictures the user brings, as the methods read them: a folder of images with kohya-style .txt
captions, fitted to the model's picture size and encoded by the checkpoint's VAE into the UNet's
scale."""
from __future__ import annotations

import torch

from ..editing.errors import InvalidInputError
from .view import ModelView


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One ComfyUI image [H, W, C] in 0..1 -> [height, width, 3]: centre-cropped to the target's aspect
    ratio (nothing is stretched), then resized with antialiasing."""
    if image.ndim != 3 or image.shape[-1] < 3:
        raise InvalidInputError(f"expected an image [H, W, 3 or 4] in 0..1, got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    scale = min(h / height, w / width)
    ch, cw = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    x = image[top:top + ch, left:left + cw, :3].movedim(-1, 0)[None].float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[0].movedim(0, -1).clamp(0, 1)


def load_image_folder(folder: str, limit: int = 1000) -> tuple[list[torch.Tensor], list[str] | None]:
    """The images in `folder` (sorted by name) as [H, W, 3] tensors in 0..1, and their captions from a
    .txt of the same name beside each (the kohya convention), or None when no image has one."""
    import os

    import numpy as np
    from PIL import Image

    if not folder or not os.path.isdir(folder):
        raise InvalidInputError(f"no folder at {folder!r}: give a folder of images (.png/.jpg/.webp, a .txt caption "
                                "beside each)")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))[:limit]
    if not names:
        raise InvalidInputError(f"{folder} holds no .png/.jpg/.webp/.bmp images")
    images, captions = [], []
    for n in names:
        with Image.open(os.path.join(folder, n)) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))
        txt = os.path.join(folder, os.path.splitext(n)[0] + ".txt")
        captions.append(open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else None)
    if all(c is None for c in captions):
        return images, None
    missing = [n for n, c in zip(names, captions) if not c]
    if missing:
        raise InvalidInputError(f"{len(missing)} image(s) in {folder} have no caption .txt beside them (e.g. "
                                f"{missing[0]}): give every image one, or none (then the benign prompts are the captions)")
    return images, captions


def encode_images(view: ModelView, vae, images) -> torch.Tensor:
    """ComfyUI images (an IMAGE batch [B, H, W, C] or a list of [H, W, C]) -> clean latents in the UNet's
    scale at the view's picture size: fitted (`fit_image`), encoded by `vae`, then ComfyUI's own
    `process_latent_in`, where the training objectives' x₀ lives."""
    if vae is None:
        raise InvalidInputError("connect the checkpoint's VAE: it encodes the benign images")
    lh, lw = view.denoiser.latent_size
    ratio = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else vae.downscale_ratio
    ratio = ratio if isinstance(ratio, int) else 8
    pixels = torch.stack([fit_image(im, lh * ratio, lw * ratio) for im in images])
    with torch.no_grad():
        z = vae.encode(pixels)
    if tuple(z.shape[-2:]) != (lh, lw):
        raise InvalidInputError(f"the VAE encodes {lh * ratio}×{lw * ratio} pixels to a {tuple(z.shape[-2:])} latent, "
                                f"not the model's {lh}×{lw}: connect the VAE that belongs to this checkpoint")
    return view.denoiser.latent_in(z.to(view.ctx.device)).float()

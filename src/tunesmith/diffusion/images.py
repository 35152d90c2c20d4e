"""Images in and out: the instance folder (validated, resized to the model's resolution), cached class images, PNG
grids. Tensors are (N, C, H, W) in [0, 1]; the UNet sees them as [-1, 1]."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch

from tunesmith.atomic import atomic_folder, atomic_write_bytes
from tunesmith.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _open(path: Path, channels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError):
        return None


def pil_to_tensor(im) -> torch.Tensor:
    """One PIL image ("L" or "RGB") as (C, H, W) float32 in [0, 1]."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)))


def to_tensor(images, resolution: int, channels: int) -> torch.Tensor:
    from PIL import Image

    return torch.stack([pil_to_tensor(im if im.size == (resolution, resolution)
                                      else im.resize((resolution, resolution), Image.BICUBIC)) for im in images])


def read_instance_images(folder: str | Path, resolution: int, channels: int, warn=None) -> torch.Tensor:
    """The subject's images, each resized to resolution × resolution (mixed or other sizes are said)."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"instance.images: {folder} is not a folder; expected a folder of 3-20 images of the subject")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    opened = [(p, _open(p, channels)) for p in files]
    unreadable = [p.name for p, im in opened if im is None]
    images = [(p, im) for p, im in opened if im is not None]
    if not images:
        seen = f" (it holds {len(files)} file(s), none an image Pillow can read: {', '.join(unreadable[:3])})" if files else " (it is empty)"
        raise DataError(f"instance.images: {folder} has no readable images{seen}; expected 3-20 images "
                        f"({', '.join(SUFFIXES)})")
    if unreadable:
        warn(f"instance.images: skipped {len(unreadable)} file(s) that are not readable images: {', '.join(unreadable[:5])}")
    if len(images) < 3 or len(images) > 20:
        warn(f"instance.images: {folder} holds {len(images)} image(s); DreamBooth expects 3-20")
    sizes = sorted({im.size for _, im in images})
    if len(sizes) > 1 or sizes[0] != (resolution, resolution):
        listed = ", ".join(f"{w}x{h}" for w, h in sizes[:4])
        warn(f"instance.images: sizes {listed}{' (mixed)' if len(sizes) > 1 else ''}; every image is resized to "
             f"{resolution}x{resolution}, the model's resolution")
    return to_tensor([im for _, im in images], resolution, channels)


def png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    a = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def read_pngs(folder: Path, channels: int, resolution: int) -> torch.Tensor | None:
    files = sorted(folder.glob("*.png"))
    if not files:
        return None
    return read_instance_images(folder, resolution, channels, warn=lambda _m: None)


def write_images(folder: Path, images: torch.Tensor, extra: dict[str, str] | None = None) -> None:
    """A folder of PNGs (and `extra` text files), whole or not at all."""
    with atomic_folder(folder) as tmp:
        for i, image in enumerate(images):
            (tmp / f"{i:04d}.png").write_bytes(png_bytes(image))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)


def grid(rows: list[torch.Tensor], scale: int = 1, pad: int = 2) -> torch.Tensor:
    """Rows of images (each (N, C, H, W)) tiled into one image, upscaled `scale`× (nearest) and padded white."""
    c, h, w = rows[0].shape[1:]
    n = max(len(r) for r in rows)
    out = torch.ones(c, len(rows) * (h * scale + pad) + pad, n * (w * scale + pad) + pad)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            big = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            out[:, y:y + h * scale, x:x + w * scale] = big
    return out


def save_grid(path: Path, rows: list[torch.Tensor], scale: int = 1) -> None:
    atomic_write_bytes(path, png_bytes(grid(rows, scale)))

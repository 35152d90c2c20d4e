"""Offline data for style and domain fine-tunes of builtin:tiny-digits, at its 8×8 RGB, built from what scikit-learn
ships (nothing downloads):

- styles: scikit-learn's digits redrawn. "inverted": dark strokes on light paper (1 − x); "bold": strokes dilated by
  one pixel (a grey dilation with a 3×3 cross). Each keeps the digit readable and moves one simple statistic (mean
  brightness 0.30 → 0.70; ink coverage, the fraction of pixels above 0.5, 0.29 → 0.61), which style_scores.py uses.
  Captions: "a drawing of the digit three in bold style".
- a domain: 8×8 patches of scikit-learn's two bundled photos (china.jpg, a temple; flower.jpg, a flower), each photo
  downscaled 8× (box filter, 80×53) first so a patch holds texture rather than one flat colour. Captions: "a photo of
  a temple" / "a photo of a flower".

Held out: a fixed 20 % of the digits (a seeded permutation, label-stratified) and, for the photos, their right
quarter (patches never overlap the training patches' pixels). write_folder writes the captioned-folder layout
diffusers' train_text_to_image reads (PNGs + metadata.jsonl with file_name and text) with a README.md that says how
the set was built. Note: the base model was pretrained on every grey digit, the held-out ones included; what it never
saw is the styles and the photos."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.errors import DataError

HELD_OUT = 0.2
SPLIT_SEED = 0
PHOTOS = {"temple": "china.jpg", "flower": "flower.jpg"}
PHOTO_DOWNSCALE = 8
PHOTO_TRAIN_COLUMNS = 0.75  # patches from the left 3/4 of each downscaled photo train; the right quarter is held out


def _invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def _dilate(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))
    return torch.stack([p[..., 1:h + 1, 1:w + 1], p[..., :h, 1:w + 1], p[..., 2:, 1:w + 1],
                        p[..., 1:h + 1, :w], p[..., 1:h + 1, 2:]]).amax(0)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Each image's mean (over pixels and channels)."""
    return images.float().flatten(1).mean(1)


def ink(images: torch.Tensor) -> torch.Tensor:
    """Each image's fraction of pixels whose grey value is above 0.5."""
    return (images.float().mean(1) > 0.5).flatten(1).float().mean(1)


@dataclass(frozen=True)
class Style:
    name: str
    draw: Callable[[torch.Tensor], torch.Tensor]  # original digits (N, 3, 8, 8) in [0, 1] → styled
    statistic: Callable[[torch.Tensor], torch.Tensor]  # per image; higher = more in the style
    description: str


STYLES = {
    "inverted": Style("inverted", _invert, brightness,
                      "dark strokes on light paper: every pixel x becomes 1 - x; told by mean brightness"),
    "bold": Style("bold", _dilate, ink,
                  "strokes one pixel wider: each pixel becomes the maximum of itself and its four neighbours "
                  "(grey dilation, 3x3 cross); told by ink coverage (fraction of pixels above 0.5)"),
}


def style(name: str) -> Style:
    if name not in STYLES:
        raise DataError(f"style: {name!r} is not one of {', '.join(STYLES)}")
    return STYLES[name]


WORDS_AT = ("after", "before")


def style_caption(label: int, name: str, words: str = "after") -> str:
    """"a drawing of the digit three in bold style" (after) or "a bold drawing of the digit three" (before)."""
    from tunesmith.diffusion.tiny import WORDS, caption

    if words not in WORDS_AT:
        raise DataError(f"words: {words!r}; expected 'after' or 'before' (where the style's words go in a caption)")
    return f"{caption(label)} in {name} style" if words == "after" else f"a {name} drawing of the digit {WORDS[label]}"


def domain_caption(subject: str) -> str:
    return f"a photo of a {subject}"


@lru_cache(maxsize=1)
def _digit_split() -> dict[str, torch.Tensor]:
    from tunesmith.diffusion.tiny import digits

    x, y = digits()
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    held = torch.zeros(len(y), dtype=torch.bool)
    for label in range(10):
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        held[idx[:round(len(idx) * HELD_OUT)]] = True
    return {"train_x": x[~held], "train_y": y[~held], "held_out_x": x[held], "held_out_y": y[held]}


def digit_split() -> dict[str, torch.Tensor]:
    """scikit-learn's 1,797 digits (grey, (N, 3, 8, 8) in [0, 1]) split per label into train and held_out."""
    return {k: v.clone() for k, v in _digit_split().items()}


def _pick(count: int | None, total: int, seed: int) -> torch.Tensor:
    if count is None:
        return torch.arange(total)
    if count < 1 or count > total:
        raise DataError(f"count: {count} images asked, the split holds {total}; expected 1..{total}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def style_set(name: str, split: str = "train", count: int | None = None, seed: int = 0, words: str = "after"):
    """(images, captions, labels) of the digits of `split` ("train" or "held_out") drawn in the style."""
    s = style(name)
    if split not in ("train", "held_out"):
        raise DataError(f"split: {split!r}; expected 'train' or 'held_out'")
    data = digit_split()
    x, y = data[f"{split}_x"], data[f"{split}_y"]
    keep = _pick(count, len(y), seed)
    labels = y[keep]
    return s.draw(x[keep]), [style_caption(int(v), name, words) for v in labels], labels


@lru_cache(maxsize=None)
def _photo(subject: str) -> torch.Tensor:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    im = Image.fromarray(load_sample_image(PHOTOS[subject]))
    small = im.resize((im.width // PHOTO_DOWNSCALE, im.height // PHOTO_DOWNSCALE), Image.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()


def photo_patches(subject: str, count: int, split: str = "train", seed: int = 0, size: int = 8) -> torch.Tensor:
    """`count` random size×size patches of the downscaled photo, from its left 3/4 (train) or right quarter."""
    if subject not in PHOTOS:
        raise DataError(f"subject: {subject!r} is not one of {', '.join(PHOTOS)}")
    if split not in ("train", "held_out"):
        raise DataError(f"split: {split!r}; expected 'train' or 'held_out'")
    photo = _photo(subject)  # cached: sliced, never written
    h, w = photo.shape[1:]
    border = int(w * PHOTO_TRAIN_COLUMNS)
    lo, hi = (0, border - size) if split == "train" else (border, w - size)
    generator = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    ys = torch.randint(0, h - size + 1, (count,), generator=generator)
    xs = torch.randint(lo, hi + 1, (count,), generator=generator)
    return torch.stack([photo[:, a:a + size, b:b + size] for a, b in zip(ys.tolist(), xs.tolist())])


def domain_set(per_subject: int, split: str = "train", seed: int = 0):
    """(images, captions, subjects): per_subject patches of each photo, captioned by the photo they come from."""
    images, captions, subjects = [], [], []
    for i, subject in enumerate(PHOTOS):
        images.append(photo_patches(subject, per_subject, split, seed + 100 * i))
        captions += [domain_caption(subject)] * per_subject
        subjects += [subject] * per_subject
    return torch.cat(images), captions, subjects


def write_folder(dest: str | Path, images: torch.Tensor, captions: list[str], readme: str) -> Path:
    """A captioned folder, whole or not at all: 0000.png … and metadata.jsonl rows {"file_name", "text"}."""
    from tunesmith.atomic import atomic_folder
    from tunesmith.diffusion.images import png_bytes

    if len(images) != len(captions):
        raise DataError(f"captions: {len(captions)} for {len(images)} images; expected one per image")
    dest = Path(dest)
    with atomic_folder(dest) as tmp:
        rows = []
        for i, (image, text) in enumerate(zip(images, captions)):
            name = f"{i:04d}.png"
            (tmp / name).write_bytes(png_bytes(image))
            rows.append(json.dumps({"file_name": name, "text": text}))
        (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
        (tmp / "README.md").write_text(readme)
    return dest


def plain_digits(count: int, split: str = "train", seed: int = 1):
    """(images, captions): `count` original digits of `split` with their plain captions ("a drawing of the digit
    three"), to mix into a set so that the new look stays tied to its own words (as DreamBooth's prior images)."""
    from tunesmith.diffusion.tiny import caption

    data = digit_split()
    x, y = data[f"{split}_x"], data[f"{split}_y"]
    keep = _pick(count, len(y), seed)
    return x[keep], [caption(int(v)) for v in y[keep]]


def _with_plain(images: torch.Tensor, captions: list[str], plain: int, split: str):
    """The set with `plain` original digits appended, and the README's note saying so."""
    if not plain:
        return images, captions, ""
    extra, extra_captions = plain_digits(plain, split)
    note = (f"\n\nMixed in: {plain} original digits of the same split (picked with seed 1), captioned plainly "
            f"(\"a drawing of the digit three\"), so the new look is learnt as belonging to its own words.")
    return torch.cat([images, extra]), captions + extra_captions, note


def write_style_folder(dest: str | Path, name: str, split: str = "train", count: int | None = None,
                       seed: int = 0, plain: int = 0, words: str = "after") -> Path:
    """The digits of `split` in the style, captioned by style_caption; `plain` original digits mixed in."""
    images, captions, labels = style_set(name, split, count, seed, words)
    per_label = ", ".join(f"{int((labels == d).sum())}" for d in range(10))
    images, captions, mixed = _with_plain(images, captions, plain, split)
    readme = (f"# Digits in {name} style ({split} split)\n\n{len(images)} images, 8x8 RGB PNG, built by "
              f"tunesmith.diffusion.styles.write_style_folder from scikit-learn's handwritten digits (load_digits: "
              f"1,797 8x8 scans, values 0-16 scaled to [0, 1], grey, light strokes on black).\n\n"
              f"Style: {STYLES[name].description}.\n\n"
              f"Split: per digit, a fixed {HELD_OUT:.0%} of the scans (seeded permutation, seed {SPLIT_SEED}) is "
              f"held out; this folder is the {split} part"
              f"{'' if count is None else f', {count} picked with seed {seed}'}."
              f"\nStyled images per digit 0-9: {per_label}.\n\nCaptions (metadata.jsonl, `text`): "
              f"\"{style_caption(3, name, words)}\" and likewise for each digit.{mixed}\n")
    return write_folder(dest, images, captions, readme)


def write_domain_folder(dest: str | Path, per_subject: int, split: str = "train", seed: int = 0,
                        plain: int = 0) -> Path:
    """per_subject patches of each photo of `split`, captioned by their photo; `plain` original digits mixed in."""
    images, captions, _ = domain_set(per_subject, split, seed)
    images, captions, mixed = _with_plain(images, captions, plain, split)
    where = "left three quarters" if split == "train" else "right quarter"
    readme = (f"# Photo patches ({split} split)\n\n{len(images)} images, 8x8 RGB PNG, built by "
              f"tunesmith.diffusion.styles.write_domain_folder from scikit-learn's two bundled sample photos "
              f"(load_sample_image: china.jpg, a temple, and flower.jpg, a flower; 640x427 each).\n\n"
              f"Each photo is downscaled {PHOTO_DOWNSCALE}x with a box filter; {per_subject} random 8x8 patches are "
              f"cut from its {where} (train patches come from the left three quarters, held-out ones from the right "
              f"quarter, so the two never share a pixel).\n\nCaptions (metadata.jsonl, `text`): "
              + ", ".join(f'"{domain_caption(s)}" ({f})' for s, f in PHOTOS.items()) + f".{mixed}\n")
    return write_folder(dest, images, captions, readme)

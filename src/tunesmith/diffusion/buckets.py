"""Aspect-ratio bucketing: images of any shape train at about the model's pixel count without being squashed.

Sizes are (width, height) here, as Pillow gives them, except the SDXL micro-conditioning fields of `Prepared`,
which are (height, width) / (top, left) as diffusers' SDXL pipelines take them.

- `make_buckets(R, multiple, max_ratio, step)`: the bucket sizes (w, h): both sides multiples of `step` (itself a
  multiple of the pixel `multiple`: 8 for SD's VAE, 16 for Flux, 1 for pixel space), area w·h ≤ R² (R = the square
  side the model was trained at), aspect max(w/h, h/w) ≤ max_ratio. For each width, the tallest height that fits;
  (h, w) for every (w, h); R×R when R is a multiple of `step`. Sorted by aspect w/h.
- `nearest_bucket` / `assign_buckets`: the bucket whose aspect is nearest the image's, in log space
  (|log(w/h) - log(W/H)|, so 1:2 and 2:1 are equally far from 1:1); ties go to the earlier bucket.
- `load_image` + `prepare`: resize so the image covers the bucket (scale = max(w/W, h/H), Pillow bicubic), crop the
  bucket's size from it (centred, or at a random offset), optionally flip it left-right. `Prepared` holds the pixels
  (C, H, W) float32 in [0, 1] (C = 1 or 3) and SDXL's per-image conditioning: original_size (H, W) of the loaded
  image, crops_coords_top_left (top, left) of the crop in the resized image as the model sees it (mirrored when
  flipped: left = resized width - bucket width - left), target_size (h, w) of the bucket.
- `BucketBatchSampler`: every batch from one bucket. Each batch is drawn afresh from the caller's generator, so its
  state is the sampler's only state: restore it (set_state) and the same batches follow, as a resumed run needs.

Random draws, in order, from the generator passed to `prepare`: random_crop → two integers (top, then left), flip →
one uniform; nothing when neither is asked for. `BucketBatchSampler.next_batch` draws one multinomial then one
permutation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.diffusion.images import pil_to_tensor
from tunesmith.errors import ConfigError, DataError


def make_buckets(resolution: int, multiple: int, max_ratio: float = 2.0, step: int | None = None) -> list[tuple[int, int]]:
    """Bucket sizes (w, h) for a model trained at resolution × resolution (see the module's docstring)."""
    step = multiple if step is None else step
    if multiple < 1 or step < 1 or step % multiple:
        raise ConfigError(f"buckets: step {step} with pixel multiple {multiple}; expected positive integers, the step "
                          "a multiple of the pixel multiple")
    if max_ratio < 1:
        raise ConfigError(f"buckets: max aspect ratio {max_ratio}; expected ≥ 1 (2.0 allows 1:2 to 2:1)")
    if resolution < step:
        raise ConfigError(f"buckets: resolution {resolution} is below the bucket step {step}; expected a resolution "
                          f"of at least {step}")
    area = resolution * resolution
    found = set()
    w = step * max(1, math.isqrt(area) // step)  # widths from about R upward give the landscape half
    while True:
        h = area // w // step * step
        if h < step or w > max_ratio * h:
            break
        if w >= h:
            found.update({(w, h), (h, w)})
        w += step
    return sorted(found, key=lambda b: b[0] / b[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket nearest in aspect to an image of size (w, h)."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - aspect))


def assign_buckets(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[int]:
    return [nearest_bucket(size, buckets) for size in sizes]


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor                     # (C, h, w) float32 in [0, 1]
    original_size: tuple[int, int]           # (H, W) of the image as loaded
    crop_top_left: tuple[int, int]           # (top, left) in the resized image, mirrored when flipped
    target_size: tuple[int, int]             # (h, w) of the bucket
    flipped: bool

    @property
    def micro(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's add_time_ids for this image: original h, w, crop top, left, target h, w."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def load_image(path: str | Path, channels: int):
    """The image as a Pillow image, EXIF orientation applied, in mode "L" (channels 1) or "RGB" (channels 3)."""
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise ConfigError(f"image channels {channels}; expected 1 (grey) or 3 (RGB)")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return im.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); expected an image file Pillow can open") from None


def prepare(image, bucket: tuple[int, int], random_crop: bool = False, flip: bool = False,
            generator: torch.Generator | None = None) -> Prepared:
    """One loaded image resized to cover `bucket` (w, h), cropped to it, flipped left-right with probability 1/2 when
    `flip`; `generator` is needed for random_crop or flip."""
    from PIL import Image

    if (random_crop or flip) and generator is None:
        raise ValueError("prepare: random_crop and flip draw from a generator; pass one")
    bw, bh = bucket
    width, height = image.size
    scale = max(bw / width, bh / height)
    nw, nh = max(bw, round(width * scale)), max(bh, round(height * scale))
    resized = image if (nw, nh) == (width, height) else image.resize((nw, nh), Image.BICUBIC)
    if random_crop:
        top = int(torch.randint(0, nh - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, nw - bw + 1, (1,), generator=generator))
    else:
        top, left = (nh - bh) // 2, (nw - bw) // 2
    cropped = resized.crop((left, top, left + bw, top + bh))
    flipped = bool(flip and torch.rand(1, generator=generator).item() < 0.5)
    if flipped:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - bw - left
    return Prepared(pil_to_tensor(cropped), (height, width), (top, left), (bh, bw), flipped)


class BucketBatchSampler:
    """Batches of image indices, all of one bucket. Each batch: a bucket drawn with probability proportional to the
    batches it would give in an epoch (ceil(n / batch_size), so every image is drawn about equally often), then
    batch_size distinct images of it uniformly (all of them, shuffled, when it holds fewer). Infinite when iterated."""

    def __init__(self, assignment: list[int], batch_size: int, generator: torch.Generator):
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size}; expected ≥ 1")
        if not assignment:
            raise DataError("no images to draw batches from")
        groups: dict[int, list[int]] = {}
        for index, bucket in enumerate(assignment):
            groups.setdefault(bucket, []).append(index)
        self.buckets = sorted(groups)                     # bucket ids in use, ascending
        self.groups = [groups[b] for b in self.buckets]   # image indices of each, ascending
        self.batch_size = batch_size
        self.generator = generator
        self.weights = torch.tensor([math.ceil(len(g) / batch_size) for g in self.groups], dtype=torch.float64)

    def next_batch(self) -> list[int]:
        k = int(torch.multinomial(self.weights, 1, generator=self.generator))
        members = self.groups[k]
        order = torch.randperm(len(members), generator=self.generator)[: self.batch_size]
        return [members[i] for i in order.tolist()]

    def __iter__(self):
        while True:
            yield self.next_batch()


def mirrored(p: Prepared) -> Prepared:
    """The same crop flipped left-right, its crop's left edge mirrored in the resized image (as `prepare` does)."""
    (height, width), (bh, bw) = p.original_size, p.target_size
    scale = max(bw / width, bh / height)
    resized_width = max(bw, round(width * scale))
    top, left = p.crop_top_left
    return Prepared(p.pixels.flip(-1), p.original_size, (top, resized_width - bw - left), p.target_size, not p.flipped)

"""Measured style and domain adaptation: scorers trained at use time (a fraction of a second) on the train split of
styles.py, applied to images (N, 3, 8, 8) in [0, 1], the tiny model's outputs or real ones.

- style score: the fraction of images judged in the style by the style's statistic (styles.py: mean brightness for
  "inverted", ink coverage for "bold") against a threshold fitted halfway between the statistic's median over the
  train digits as drawn originally and as drawn in the style.
- content kept: the fraction of images in which a digit reader reads the prompt's digit. The reader is a nearest-
  neighbour vote (k=3, grey pixels) over the train digits, each present as scanned and redrawn in every style (the
  redrawing keeps the label). A reader of the original look alone reads only 63 % of held-out bold digits and almost
  no inverted ones: it would measure the style, not the digit.
- domain: a nearest-neighbour vote (k=5, RGB pixels) over the train digits and the train photo patches says, per
  image, "digit" or the photo it looks like; domain score = fraction judged a photo, subject kept = fraction judged
  the prompt's photo."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from tunesmith.diffusion import styles
from tunesmith.errors import DataError

READER_K = 3
LOOK_K = 5
PATCHES_PER_PHOTO = 300
LOOKS = ["digit", *styles.PHOTOS]


def _vote(refs: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Each query's label by majority among its k nearest references (ties: the nearest of the tied labels)."""
    nearest = torch.cdist(queries, refs).topk(k, largest=False).indices  # nearest first
    weight = 1 + 1e-3 * torch.arange(k, 0, -1, dtype=torch.float32)  # a vote each; the nearer vote breaks a tie
    tally = torch.zeros(len(queries), int(labels.max()) + 1)
    tally.scatter_add_(1, labels[nearest], weight.expand(len(queries), k))
    return tally.argmax(1)


def _check(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (8, 8):
        raise DataError(f"images: shape {tuple(images.shape)}; expected (N, 3, 8, 8) in [0, 1]")
    return images.float()


def _grey(images: torch.Tensor) -> torch.Tensor:
    return _check(images).mean(1).flatten(1)


@dataclass
class Scorers:
    reader_x: torch.Tensor  # (M, 64) grey train digits, each as scanned and in every style
    reader_y: torch.Tensor
    thresholds: dict[str, float]  # style name → statistic threshold
    look_x: torch.Tensor  # (M', 192) train digits and photo patches
    look_y: torch.Tensor  # index into LOOKS

    def read(self, images: torch.Tensor) -> torch.Tensor:
        """The digit read in each image."""
        return _vote(self.reader_x, self.reader_y, _grey(images), READER_K)

    def content_kept(self, images: torch.Tensor, digits) -> float:
        """Fraction of images in which the reader reads the intended digit (`digits`: one per image)."""
        digits = torch.as_tensor(digits).flatten()
        if len(digits) != len(images):
            raise DataError(f"digits: {len(digits)} for {len(images)} images; expected one intended digit per image")
        return (self.read(images) == digits).float().mean().item()

    def in_style(self, images: torch.Tensor, name: str) -> torch.Tensor:
        return styles.style(name).statistic(_check(images)) > self.thresholds[name]

    def style_score(self, images: torch.Tensor, name: str) -> float:
        """Fraction of images judged drawn in the style."""
        return self.in_style(images, name).float().mean().item()

    def look(self, images: torch.Tensor) -> list[str]:
        """"digit" or the photo ("temple", "flower") each image looks like."""
        found = _vote(self.look_x, self.look_y, _check(images).flatten(1), LOOK_K)
        return [LOOKS[i] for i in found.tolist()]

    def domain_score(self, images: torch.Tensor) -> float:
        """Fraction of images judged a photo patch rather than a digit."""
        looks = self.look(images)
        return sum(v != "digit" for v in looks) / len(looks)

    def subject_kept(self, images: torch.Tensor, subjects: list[str]) -> float:
        """Fraction of images judged a patch of the prompt's photo (`subjects`: one per image)."""
        if len(subjects) != len(images):
            raise DataError(f"subjects: {len(subjects)} for {len(images)} images; expected one per image")
        return sum(a == b for a, b in zip(self.look(images), subjects)) / len(subjects)


@lru_cache(maxsize=1)
def train_scorers() -> Scorers:
    data = styles.digit_split()
    x, y = data["train_x"], data["train_y"]
    drawn = [x] + [s.draw(x) for s in styles.STYLES.values()]
    thresholds = {}
    for name, s in styles.STYLES.items():
        plain, styled = s.statistic(x).median(), s.statistic(s.draw(x)).median()
        thresholds[name] = float((plain + styled) / 2)
    patches = [styles.photo_patches(subject, PATCHES_PER_PHOTO, "train", seed=100 * i)
               for i, subject in enumerate(styles.PHOTOS)]
    look_y = torch.cat([torch.zeros(len(x), dtype=torch.long)]
                       + [torch.full((len(p),), i + 1, dtype=torch.long) for i, p in enumerate(patches)])
    return Scorers(reader_x=torch.cat([_grey(d) for d in drawn]), reader_y=y.repeat(len(drawn)),
                   thresholds=thresholds, look_x=torch.cat([x, *patches]).flatten(1), look_y=look_y)

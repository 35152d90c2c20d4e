"""The embedded style and domain demos of text-to-image fine-tuning: builtin:tiny-digits (pretrained on grey digits)
fine-tuned on a restyled digit set (bold strokes) or a new domain (8×8 photo patches), both built offline by
styles.py into the cache; and the measurements printed before → after on fixed prompts and seeds (style_scores.py):
whether the styled prompts come out in the style with the right digit, whether the photo prompts come out as the
photos, and how much of it leaks into a plain digit prompt. The domain set mixes 600 plain digits in (without them
the plain prompt turned into a photo: right digit 0.89 → 0.15-0.22); on the style set even 500 only halve the leak,
because the tiny model reads its captions by word position (docs/benchmarks/text-to-image.md), so the style demo shows
the leak as it is."""

from __future__ import annotations

from pathlib import Path

from tunesmith.diffusion import styles
from tunesmith.diffusion.tiny import WORDS, caption

STYLE = "bold"
PROMPT_DIGITS = (3, 7)
PLAIN_DIGIT = 3
METHOD = {"name": "lora", "r": 8, "alpha": 8,
          "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]}
TRAIN = {"steps": 300, "batch_size": 16, "lr": 1e-3, "save_every": 100, "threads": 1}
DEMOS = {
    "style": {
        "model": "builtin:tiny-digits", "output_dir": "runs/style_demo", "seed": 0,
        "data": {"images": "builtin:digits-bold", "caption_dropout": 0.1},
        "method": METHOD, "train": TRAIN,
        "sample": {"prompts": [styles.style_caption(d, STYLE) for d in PROMPT_DIGITS] + [caption(PLAIN_DIGIT)],
                   "per_prompt": 8, "steps": 25, "guidance_scale": 1.0, "seed": 1234},
    },
    "domain": {
        "model": "builtin:tiny-digits", "output_dir": "runs/domain_demo", "seed": 0,
        "data": {"images": "builtin:photo-patches", "caption_dropout": 0.1},
        "method": METHOD, "train": TRAIN,
        "sample": {"prompts": [styles.domain_caption(s) for s in styles.PHOTOS] + [caption(PLAIN_DIGIT)],
                   "per_prompt": 8, "steps": 25, "guidance_scale": 1.0, "seed": 1234},
    },
}
DATA_VERSION = 2  # a new version when a set's recipe changes: the cached folder is named after it
DATASETS = {"builtin:digits-bold": lambda dest: styles.write_style_folder(dest, STYLE),
            "builtin:photo-patches": lambda dest: styles.write_domain_folder(dest, per_subject=300, plain=600)}


def data_folder(name: str) -> Path:
    """A builtin data set's captioned folder, written once into the cache ($TUNESMITH_CACHE/data/)."""
    from tunesmith.errors import DataError
    from tunesmith.models import cache_dir

    if name not in DATASETS:
        raise DataError(f"data.images: unknown builtin {name!r}; the embedded sets are {', '.join(DATASETS)}")
    dest = cache_dir().parent / "data" / f"{name.split(':', 1)[1]}-v{DATA_VERSION}"
    if not (dest / "metadata.jsonl").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        DATASETS[name](dest)
    return dest


def measure_demo(cfg):
    """before/after numbers on the demo's prompts (style_scores.py; the scorers fit in about a second)."""
    import torch

    from tunesmith.diffusion.style_scores import train_scorers

    scorers = train_scorers()
    words = {w: i for i, w in enumerate(WORDS)}

    def digit_of(prompt: str) -> int:
        return next(words[w] for w in prompt.split() if w in words)

    photos = {styles.domain_caption(s): s for s in styles.PHOTOS}

    def measure(before: dict, after: dict) -> dict:
        out = {}
        domain = any(p in photos for p in before)
        for prompt in before:
            b, a = before[prompt], after[prompt]
            if prompt in photos:
                subject = photos[prompt]
                out[f'"{prompt}": looks like the {subject} photo (fraction)'] = (
                    scorers.subject_kept(b, [subject] * len(b)), scorers.subject_kept(a, [subject] * len(a)))
                continue
            if prompt.endswith(f"in {STYLE} style"):
                out[f'"{prompt}": in {STYLE} style (fraction)'] = (scorers.style_score(b, STYLE),
                                                                 scorers.style_score(a, STYLE))
            digit = torch.full((len(b),), digit_of(prompt))
            out[f'"{prompt}": right digit read (fraction)'] = (scorers.content_kept(b, digit),
                                                             scorers.content_kept(a, digit))
            if prompt.endswith("style"):
                continue
            if domain:
                out[f'"{prompt}": looks like a photo (fraction; plain prompt, lower = prior kept)'] = (
                    scorers.domain_score(b), scorers.domain_score(a))
            else:
                out[f'"{prompt}": in {STYLE} style (fraction; plain prompt, lower = prior kept)'] = (
                    scorers.style_score(b, STYLE), scorers.style_score(a, STYLE))
        return out

    return measure

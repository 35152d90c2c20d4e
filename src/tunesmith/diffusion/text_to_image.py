"""Text-to-image fine-tuning on a captioned image folder (style and domain adaptation), LoRA or full, on any pipeline
family: the images (captions.py) go into aspect buckets (buckets.py), each batch from one bucket; captions are
dropped with `data.caption_dropout` (classifier-free guidance keeps working); each image's VAE posterior is encoded
once (both flips with random_flip) unless random_crop asks for a new crop every step. Around it the same session as
DreamBooth (session.py): fixed-seed before/after grids, grids every `sample.every` steps, EMA, min-SNR, resume,
TensorBoard, loss.png, report.md."""

from __future__ import annotations

import shutil
import time

import torch

from tunesmith.atomic import atomic_write_text
from tunesmith.diffusion import buckets as bucketing
from tunesmith.diffusion import checkpoint
from tunesmith.diffusion.captions import CaptionedImage, drop_captions, read_captioned_folder
from tunesmith.diffusion.config import TextToImageConfig, dump
from tunesmith.diffusion.latents import draw, posterior
from tunesmith.diffusion.loop import Batch
from tunesmith.diffusion.session import RunResult, Session, open_session, train_and_save, warn


class CaptionedBatches:
    """The run's batch source: `next_batch(generator)` for the loop. Every draw (bucket, images, crop, flip,
    dropped captions, posterior sample) comes from the generator the loop checkpoints."""

    def __init__(self, session: Session, records: list[CaptionedImage]):
        cfg, family, pipe = session.cfg, session.family, session.pipe
        self.session, self.records, self.data = session, records, cfg.data
        self.channels = family.channels(pipe)
        resolution = family.resolution(pipe)
        multiple = family.pixel_multiple(pipe)
        if cfg.data.bucketing:
            self.buckets = bucketing.make_buckets(resolution, multiple, cfg.data.max_aspect)
        else:
            side = resolution - resolution % multiple
            self.buckets = [(side, side)]
        self.assignment = bucketing.assign_buckets([r.size for r in records], self.buckets)
        self.batch_size = cfg.train.batch_size
        self.sampler = None
        self.vae = getattr(pipe, "vae", None)
        self.views = self._encode_views() if cfg.data.cache_latents and not cfg.data.random_crop else None

    def buckets_used(self) -> dict[tuple[int, int], int]:
        used: dict[tuple[int, int], int] = {}
        for b in self.assignment:
            used[self.buckets[b]] = used.get(self.buckets[b], 0) + 1
        return used

    def _prepared(self, index: int, generator: torch.Generator | None = None) -> bucketing.Prepared:
        image = bucketing.load_image(self.records[index].path, self.channels)
        random = generator is not None
        return bucketing.prepare(image, self.buckets[self.assignment[index]], generator=generator,
                                 random_crop=random and self.data.random_crop, flip=random and self.data.random_flip)

    def _encode_views(self) -> list[list[tuple]]:
        """Per image: its centre crop (and mirrored crop) as (posterior mean, std, micro), or pixels without a VAE."""
        views: list[list[tuple]] = [[] for _ in self.records]
        for bucket in sorted(set(self.assignment)):
            members = [i for i, b in enumerate(self.assignment) if b == bucket]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prepared = [self._prepared(i) for i in chunk]
                flips = [prepared] + ([[bucketing.mirrored(p) for p in prepared]] if self.data.random_flip else [])
                for group in flips:
                    pixels = torch.stack([p.pixels for p in group]) * 2 - 1
                    if self.vae is None:
                        encoded = [(px, None) for px in pixels]
                    else:
                        mean, std = posterior(self.vae, pixels, self.batch_size)
                        encoded = list(zip(mean.cpu(), std.cpu()))
                    for i, p, (m, s) in zip(chunk, group, encoded):
                        views[i].append((m, s, p.micro))
        return views

    def next_batch(self, generator: torch.Generator) -> Batch:
        if self.sampler is None or self.sampler.generator is not generator:
            self.sampler = bucketing.BucketBatchSampler(self.assignment, self.batch_size, generator)
        rows = self.sampler.next_batch()
        device = self.session.device
        if self.views is not None:
            picked = []
            for i in rows:
                flip = self.data.random_flip and torch.rand(1, generator=generator).item() < 0.5
                picked.append(self.views[i][1 if flip else 0])
            micro = [m for _, _, m in picked]
            if self.vae is None:
                clean = torch.stack([px for px, _, _ in picked]).to(device)
            else:
                mean = torch.stack([m for m, _, _ in picked]).to(device)
                std = torch.stack([s for _, s, _ in picked]).to(device)
                clean = draw(self.vae, mean, std, generator)
        else:
            prepared = [self._prepared(i, generator) for i in rows]
            micro = [p.micro for p in prepared]
            pixels = torch.stack([p.pixels for p in prepared]) * 2 - 1
            clean = self.session.family.encode_images(self.session.pipe, pixels, generator)
        captions = drop_captions([self.records[i].caption for i in rows], self.data.caption_dropout, generator)
        return Batch(prompts=captions, clean=clean, groups={"denoising": (0, len(rows), 1.0)},
                     micro=torch.tensor(micro, dtype=torch.float32, device=device))


def text_to_image(cfg: TextToImageConfig, overwrite: bool = False, resume: bool = False, quiet: bool = False,
                  measure=None) -> RunResult:
    """`measure(before, after) -> {name: (before, after)}` (optional) adds measurements to the report."""
    from tunesmith.diffusion.report import write_report

    started = time.perf_counter()
    session = open_session(cfg, overwrite, resume, quiet)
    images = cfg.data.images
    if images.startswith("builtin:"):
        from tunesmith.diffusion.style_demo import data_folder

        images = str(data_folder(images))
    records = read_captioned_folder(images, cfg.data.caption_column, cfg.data.caption_extension, warn=warn)
    source = CaptionedBatches(session, records)
    cfg_text = dump(cfg)
    atomic_write_text(session.run_dir / "config.yaml", cfg_text)
    prompts = cfg.grid_prompts([r.caption for r in records])
    before = session.render(prompts, cfg.sample.per_prompt, cfg.sample.seed)
    session.save_grid("samples_before.png", before)
    generator = torch.Generator().manual_seed(cfg.seed)
    trained = train_and_save(session, source.next_batch, generator, "text-to-image", prompts, resume, quiet)
    after = session.render(prompts, cfg.sample.per_prompt, cfg.sample.seed)
    session.save_grid("samples_after.png", after)

    family, pipe = session.family, session.pipe
    used = source.buckets_used()
    facts = [f"model: `{cfg.model}` ({family.name} pipeline, "
             f"{'latent space (VAE)' if source.vae is not None else 'pixel space'}, "
             f"{family.resolution(pipe)}×{family.resolution(pipe)})",
             f"method: {cfg.method.name}{' + text encoder' if cfg.method.train_text_encoder else ''}; trainable "
             f"parameters {trained.trainable:,} of {trained.total:,}",
             f"data: {len(records)} captioned images from `{images}`; caption dropout "
             f"{cfg.data.caption_dropout}; buckets (w×h: images) "
             + ", ".join(f"{w}×{h}: {n}" for (w, h), n in sorted(used.items()))
             + f"; latents {'cached once' if source.views is not None else 'encoded every step'}",
             f"target: {session.noising.prediction_type}; steps {cfg.train.steps}; batch {cfg.train.batch_size}; "
             f"min-SNR γ {cfg.train.min_snr_gamma or 'off'}; EMA {cfg.train.ema_decay or 'off'}; device "
             f"{session.device}",
             f"training time: {trained.seconds:.1f} s",
             f"weights: `{trained.weights.relative_to(session.run_dir)}`"]
    measures = measure(before, after) if measure is not None else {}
    summary = {"facts": facts, "rows": trained.rows, "prompts": prompts, "measures": measures,
               "seconds": time.perf_counter() - started, "images": len(records), "buckets": used,
               "train_seconds": trained.seconds}
    write_report(session.run_dir, "Text-to-image run", facts, trained.rows, prompts, measures, cfg_text,
                 summary["seconds"])
    for old in checkpoint.list_checkpoints(session.run_dir):  # the run is whole: its weights replace the checkpoints
        shutil.rmtree(old, ignore_errors=True)
    return RunResult(session.run_dir, trained.weights, before, after, summary)

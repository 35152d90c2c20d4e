"""One DreamBooth run end to end: validate the inputs, load the pipeline (session.py), generate (or reuse) the class
images, sample the before grid, train on instance + class images, save the weights in diffusers' formats, sample the
after grid, write report.md."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from tunesmith.atomic import atomic_write_text
from tunesmith.diffusion import checkpoint, images
from tunesmith.diffusion.config import DreamBoothConfig, dump
from tunesmith.diffusion.loop import Batch
from tunesmith.diffusion.progress import bar
from tunesmith.diffusion.session import RunResult, Session, open_session, train_and_save, warn

CLASS_IMAGES = "class_images"


def identifier_warning(cfg: DreamBoothConfig) -> str | None:
    if cfg.instance.identifier in cfg.instance.prompt.split():
        return None
    return (f"instance.prompt {cfg.instance.prompt!r} does not contain the identifier {cfg.instance.identifier!r} "
            "(instance.identifier) as a word; the subject gets bound to the prompt's ordinary words instead, which "
            "changes what those words mean to the model")


def instance_folder(cfg: DreamBoothConfig, model_folder: Path) -> Path:
    """`builtin:tiny-digits/subject` names the demo subject's images inside the cached model folder."""
    name = cfg.instance.images
    if name.startswith("builtin:"):
        return model_folder / name.split("/", 1)[1] if "/" in name else model_folder
    return Path(name)


def class_images(session: Session, channels: int, quiet: bool) -> torch.Tensor:
    """N images of the class prompt from the base pipeline at the prior's guidance, cached in run_dir/class_images:
    reused while they are at least N and were made by the same model, prompt, steps, guidance, seed and chunk (each
    chunk of train.batch_size images is rendered from its own seed)."""
    cfg = session.cfg
    folder = session.run_dir / CLASS_IMAGES
    stamp = folder / "made_by.json"
    n, resolution = cfg.prior.num_images, session.family.resolution(session.pipe)
    guidance = session.guidance(cfg.prior.guidance_scale)
    made_by = json.dumps({"model": cfg.model, "class_prompt": cfg.prior.class_prompt, "steps": cfg.prior.steps,
                          "guidance_scale": guidance, "seed": cfg.seed, "at_a_time": cfg.train.batch_size},
                         sort_keys=True)
    if stamp.is_file() and stamp.read_text() == made_by and len(list(folder.glob("*.png"))) >= n:
        return images.read_pngs(folder, channels, resolution)[:n]
    made = []
    with bar(quiet) as progress:
        task = progress.add_task("class images", total=n)
        for start in range(0, n, cfg.train.batch_size):  # as many as a training step's rows (guidance doubles them)
            k = min(cfg.train.batch_size, n - start)
            made.append(session.render([cfg.prior.class_prompt], k, cfg.seed + 1 + start, cfg.prior.steps,
                                       guidance)[cfg.prior.class_prompt])
            progress.update(task, advance=k)
    images.write_images(folder, torch.cat(made), extra={"made_by.json": made_by})
    return images.read_pngs(folder, channels, resolution)[:n]  # the 8-bit PNGs later runs reuse


def batches(session: Session, instance: torch.Tensor, classes: torch.Tensor | None):
    """Each step: batch_size instance images and, with prior preservation, as many class images; every image's
    latent posterior encoded once (latents.py)."""
    from tunesmith.diffusion.latents import LatentCache

    cfg = session.cfg
    vae = getattr(session.pipe, "vae", None)
    bs = cfg.train.batch_size  # images encoded at a time, too: a batch that fits training fits encoding
    inst = LatentCache(vae, instance * 2 - 1, session.device, bs)
    weight = cfg.prior.weight if classes is not None else 0.0
    prior = LatentCache(vae, classes * 2 - 1, session.device, bs) if weight > 0 else None
    prompts = [cfg.instance.prompt] * bs + ([cfg.prior.class_prompt] * bs if weight > 0 else [])
    groups = {"instance": (0, bs, 1.0), "prior": (bs, 2 * bs, weight)}

    def next_batch(generator: torch.Generator) -> Batch:
        clean = inst.draw(torch.randint(len(inst), (bs,), generator=generator), generator)
        if prior is not None:
            clean = torch.cat([clean, prior.draw(torch.randint(len(prior), (bs,), generator=generator), generator)])
        return Batch(prompts=prompts, clean=clean, groups=groups)

    return next_batch


def dreambooth(cfg: DreamBoothConfig, overwrite: bool = False, resume: bool = False, quiet: bool = False,
               measure=None) -> RunResult:
    """`measure(before, after) -> {name: (before, after)}` (optional) adds measurements to the report."""
    started = time.perf_counter()
    from tunesmith.diffusion.report import write_report

    session = open_session(cfg, overwrite, resume, quiet, keep=(CLASS_IMAGES,))  # class images: base model's only
    message = identifier_warning(cfg)
    if message:
        warn(message)
    family, pipe, run_dir = session.family, session.pipe, session.run_dir
    channels, resolution = family.channels(pipe), family.resolution(pipe)
    instance = images.read_instance_images(instance_folder(cfg, session.model_folder), resolution, channels, warn=warn)
    cfg_text = dump(cfg)
    atomic_write_text(run_dir / "config.yaml", cfg_text)
    classes = class_images(session, channels, quiet) if cfg.prior.weight > 0 else None
    prompts = cfg.grid_prompts()
    before = session.render(prompts, cfg.sample.per_prompt, cfg.sample.seed)
    session.save_grid("samples_before.png", before)

    generator = torch.Generator().manual_seed(cfg.seed)
    trained = train_and_save(session, batches(session, instance, classes), generator, "dreambooth", prompts,
                             resume, quiet)
    after = session.render(prompts, cfg.sample.per_prompt, cfg.sample.seed)
    session.save_grid("samples_after.png", after)

    space = "latent space (VAE)" if getattr(pipe, "vae", None) is not None else "pixel space"
    prior = (f"weight {cfg.prior.weight}, {len(classes)} class images for \"{cfg.prior.class_prompt}\" (class_images/)"
             if classes is not None else "off")
    facts = [f"model: `{cfg.model}` ({family.name} pipeline, {space}, {resolution}×{resolution})",
             f"method: {cfg.method.name}{' + text encoder' if cfg.method.train_text_encoder else ''}; trainable "
             f"parameters {trained.trainable:,} of {trained.total:,}",
             f"instance images: {len(instance)} from `{instance_folder(cfg, session.model_folder)}`; prompt "
             f"\"{cfg.instance.prompt}\"",
             f"prior preservation: {prior}",
             f"target: {session.noising.prediction_type}; steps {cfg.train.steps}; device {session.device}",
             f"training time: {trained.seconds:.1f} s",
             f"weights: `{trained.weights.relative_to(run_dir)}`"]
    measures = measure(before, after) if measure is not None else {}
    seconds = time.perf_counter() - started
    write_report(run_dir, "DreamBooth run", facts, trained.rows, prompts, measures, cfg_text, seconds)
    summary = {"facts": facts, "rows": trained.rows, "prompts": prompts, "measures": measures, "seconds": seconds,
               "class_images": 0 if classes is None else len(classes), "train_seconds": trained.seconds}
    for old in checkpoint.list_checkpoints(run_dir):  # the run is whole: its weights replace the checkpoints
        shutil.rmtree(old, ignore_errors=True)
    return RunResult(run_dir=run_dir, weights=trained.weights, before=before, after=after, summary=summary)

"""One DreamBooth run end to end: validate the inputs, load the model, generate (or reuse) the class images, sample
the before grid, train, save the weights in diffusers' format, sample the after grid, write report.md."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.atomic import atomic_write_text
from tunesmith.devices import pick_device
from tunesmith.diffusion import checkpoint, images
from tunesmith.diffusion.components import load_pipeline, resolve_model
from tunesmith.diffusion.config import DreamBoothConfig, dump
from tunesmith.diffusion.loop import autocast, train
from tunesmith.diffusion.progress import bar
from tunesmith.errors import OutputDirError

CLASS_IMAGES = "class_images"


@dataclass
class DreamBoothResult:
    run_dir: Path
    weights: Path
    before: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt → (N, C, H, W) in [0, 1]
    after: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def grid_scale(resolution: int) -> int:
    """Small images are shown enlarged (nearest neighbour) to at least 64 pixels a side."""
    return max(1, 64 // resolution)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def identifier_warning(cfg: DreamBoothConfig) -> str | None:
    if cfg.instance.identifier in cfg.instance.prompt.split():
        return None
    return (f"instance.prompt {cfg.instance.prompt!r} does not contain the identifier {cfg.instance.identifier!r} "
            "(instance.identifier) as a word; the subject gets bound to the prompt's ordinary words instead, which "
            "changes what those words mean to the model")


def check_output_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            raise OutputDirError(f"output_dir {run_dir}: nothing to resume (no checkpoints there)")
        return
    if resume:
        if not checkpoint.list_checkpoints(run_dir):
            raise OutputDirError(f"output_dir {run_dir}: --resume given but it holds no checkpoint")
        return
    if not overwrite:
        raise OutputDirError(f"output_dir {run_dir} already holds a run (or other files). Pass --overwrite to replace "
                             "it, --resume to continue it from its last checkpoint, or choose another output_dir.")
    cached = run_dir / CLASS_IMAGES
    for child in run_dir.iterdir():  # the class images stay: they depend only on the base model and the class prompt
        if child != cached:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def instance_folder(cfg: DreamBoothConfig, model_folder: Path) -> Path:
    """`builtin:tiny-digits/subject` names the demo subject's images inside the cached model folder."""
    name = cfg.instance.images
    if name.startswith("builtin:"):
        return model_folder / name.split("/", 1)[1] if "/" in name else model_folder
    return Path(name)


def render(pipe, cfg: DreamBoothConfig, prompts: list[str], n: int, seed: int, steps: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    with autocast(pipe.unet.device, cfg.train.precision):
        for prompt in prompts:
            out[prompt] = pipe(prompt, num_inference_steps=steps or cfg.sample.steps,
                               guidance_scale=cfg.sample.guidance_scale, generator=generator,
                               num_images_per_prompt=n)
    return out


def class_images(pipe, cfg: DreamBoothConfig, run_dir: Path, channels: int, quiet: bool) -> torch.Tensor:
    """N images of the class prompt from the base pipeline, cached in run_dir/class_images: reused while they are at
    least N and were made by the same model, prompt, steps, guidance and seed."""
    import json

    folder = run_dir / CLASS_IMAGES
    stamp = folder / "made_by.json"
    n = cfg.prior.num_images
    made_by = json.dumps({"model": cfg.model, "class_prompt": cfg.prior.class_prompt, "steps": cfg.prior.steps,
                          "guidance_scale": cfg.sample.guidance_scale, "seed": cfg.seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == made_by and len(list(folder.glob("*.png"))) >= n:
        return images.read_pngs(folder, channels, pipe.resolution)[:n]
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    made = []
    with bar(quiet) as progress:
        task = progress.add_task("class images", total=n)
        for start in range(0, n, 16):
            k = min(16, n - start)
            with autocast(pipe.unet.device, cfg.train.precision):
                made.append(pipe(cfg.prior.class_prompt, num_inference_steps=cfg.prior.steps,
                                 guidance_scale=cfg.sample.guidance_scale, generator=generator,
                                 num_images_per_prompt=k))
            progress.update(task, advance=k)
    images.write_images(folder, torch.cat(made), extra={"made_by.json": made_by})
    return images.read_pngs(folder, channels, pipe.resolution)[:n]  # the 8-bit PNGs later runs reuse


def dreambooth(cfg: DreamBoothConfig, overwrite: bool = False, resume: bool = False, quiet: bool = False,
               measure=None) -> DreamBoothResult:
    """`measure(before, after) -> {name: (before, after)}` (optional) adds measurements to the report."""
    from tunesmith.diffusion import saving, trainable
    from tunesmith.methods.base import count_parameters

    started = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    check_output_dir(run_dir, overwrite, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    message = identifier_warning(cfg)
    if message:
        warn(message)
    model_folder = resolve_model(cfg.model, quiet=quiet)
    device = pick_device(cfg.train.device)
    pipe, scheduler = load_pipeline(model_folder, device)
    channels = pipe.vae.config.in_channels if pipe.vae is not None else pipe.unet.config.in_channels
    instance = images.read_instance_images(instance_folder(cfg, model_folder), pipe.resolution, channels, warn=warn)
    cfg_text = dump(cfg)
    atomic_write_text(run_dir / "config.yaml", cfg_text)
    classes = class_images(pipe, cfg, run_dir, channels, quiet) if cfg.prior.weight > 0 else None
    prompts = cfg.grid_prompts()
    before = render(pipe, cfg, prompts, cfg.sample.per_prompt, cfg.sample.seed)
    images.save_grid(run_dir / "samples_before.png", list(before.values()), grid_scale(pipe.resolution))

    torch.manual_seed(cfg.seed)  # LoRA's init and dropout: the same whether or not the model was just pretrained here
    trained = trainable.apply(pipe, cfg.method)
    n_train, n_total = 0, 0
    for module in trained.values():
        t, a = count_parameters(module)
        n_train, n_total = n_train + t, n_total + a
    train_start = time.perf_counter()
    with bar(quiet) as progress:
        task = progress.add_task("dreambooth", total=cfg.train.steps)
        if resume:
            saved = checkpoint.list_checkpoints(run_dir)
            progress.update(task, completed=int(saved[-1].name.split("-")[1]) if saved else 0)
        rows = train(cfg, pipe, scheduler, trained, instance, classes, run_dir, resume=resume,
                     on_step=lambda r: progress.update(task, completed=r["step"],
                                                       description=f"dreambooth loss {r['loss']:.4f}"))
    train_seconds = time.perf_counter() - train_start
    if cfg.method.name == "lora":
        weights = saving.save_lora(run_dir / "lora", trained, cfg.method).parent
    else:
        weights = saving.save_full(run_dir / "pipeline", pipe)
    after = render(pipe, cfg, prompts, cfg.sample.per_prompt, cfg.sample.seed)
    images.save_grid(run_dir / "samples_after.png", list(after.values()), grid_scale(pipe.resolution))

    summary = {"model": cfg.model, "space": "latent space (VAE)" if pipe.vae is not None else "pixel space",
               "resolution": pipe.resolution, "method": cfg.method.name + (" + text encoder" if cfg.method.train_text_encoder else ""),
               "trainable": n_train, "total": n_total, "instance_images": len(instance),
               "instance_folder": str(instance_folder(cfg, model_folder)), "instance_prompt": cfg.instance.prompt,
               "prior_weight": cfg.prior.weight, "class_images": 0 if classes is None else len(classes),
               "class_prompt": cfg.prior.class_prompt, "prediction_type": scheduler.config.prediction_type,
               "steps": cfg.train.steps, "device": str(device), "train_seconds": train_seconds,
               "weights": str(weights.relative_to(run_dir)), "prompts": prompts}
    if rows:
        head, tail = rows[:10], rows[-10:]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        summary.update(first_loss=mean(head, "loss"), last_loss=mean(tail, "loss"),
                       first_instance=mean(head, "instance_loss"), last_instance=mean(tail, "instance_loss"),
                       first_prior=mean(head, "prior_loss"), last_prior=mean(tail, "prior_loss"))
    if measure is not None:
        summary["measures"] = measure(before, after)
    summary["seconds"] = time.perf_counter() - started
    write_report(run_dir, cfg_text, summary)
    for old in checkpoint.list_checkpoints(run_dir):  # the run is whole: its weights replace the checkpoints
        shutil.rmtree(old, ignore_errors=True)
    return DreamBoothResult(run_dir=run_dir, weights=weights, before=before, after=after, summary=summary)


def write_report(run_dir, cfg_text, summary):
    from tunesmith.diffusion.report import write_report as write

    return write(run_dir, cfg_text, summary)

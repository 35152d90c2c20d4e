"""What every diffusion run does around its own data (run.py: DreamBooth; text_to_image.py): check the output
folder, load the pipeline through its family, render fixed-seed grids, train with a progress bar (and grids every
`sample.every` steps), keep an EMA if asked, and save the weights in diffusers' formats."""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.diffusion import checkpoint, images
from tunesmith.diffusion.loop import LoopSettings, autocast, train
from tunesmith.diffusion.progress import bar
from tunesmith.errors import OutputDirError
from tunesmith.runlog import plot_losses


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def grid_scale(resolution: int) -> int:
    """Small images are shown enlarged (nearest neighbour) to at least 64 pixels a side."""
    return max(1, 64 // resolution)


def check_output_dir(run_dir: Path, overwrite: bool, resume: bool, keep: tuple[str, ...] = ()) -> None:
    """A fresh or empty folder; --resume needs a checkpoint there; --overwrite clears it except the `keep` names."""
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
    for child in run_dir.iterdir():
        if child.name not in keep:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def usual_guidance(model: str, family, value: float | None = None) -> float:
    """A configured guidance scale, else the pipeline's usual one (the embedded tiny model: 1, as measured)."""
    from tunesmith.diffusion.config import DEMO_MODEL

    if value is not None:
        return float(value)
    return 1.0 if model == DEMO_MODEL else family.guidance_scale


@dataclass
class Session:
    cfg: object
    run_dir: Path
    family: object
    pipe: object
    noising: object
    device: torch.device
    model_folder: Path

    def guidance(self, value: float | None) -> float:
        return usual_guidance(self.cfg.model, self.family, value)

    def render(self, prompts: list[str], n: int, seed: int, steps: int | None = None,
               guidance: float | None = None) -> dict[str, torch.Tensor]:
        """prompt → (n, C, H, W) in [0, 1], from one CPU generator seeded `seed`."""
        generator = torch.Generator().manual_seed(seed)
        scale = self.guidance(guidance if guidance is not None else self.cfg.sample.guidance_scale)
        with autocast(self.device, self.cfg.train.precision):
            return {p: self.family.sample(self.pipe, [p], n, steps or self.cfg.sample.steps, scale, generator)
                    for p in prompts}

    def save_grid(self, name: str, rendered: dict[str, torch.Tensor]) -> Path:
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        images.save_grid(path, list(rendered.values()), grid_scale(self.family.resolution(self.pipe)))
        return path


def open_session(cfg, overwrite: bool, resume: bool, quiet: bool, keep: tuple[str, ...] = ()) -> Session:
    from tunesmith.devices import pick_device
    from tunesmith.diffusion.components import load_pipeline, resolve_model
    from tunesmith.diffusion.noise import Noising

    run_dir = Path(cfg.output_dir)
    check_output_dir(run_dir, overwrite, resume, keep)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model_folder = resolve_model(cfg.model, quiet=quiet)
    device = pick_device(cfg.train.device)
    family, pipe, scheduler = load_pipeline(model_folder, device)
    return Session(cfg, run_dir, family.configured(cfg.train), pipe, Noising(scheduler), device, model_folder)


def settings_of(cfg, trained: dict) -> LoopSettings:
    """The loop's settings from a run config (with a fresh EMA over the trained parameters when asked)."""
    ema = None
    if cfg.train.ema_decay:
        from tunesmith.diffusion.ema import EMA
        from tunesmith.diffusion.trainable import named_trainable

        ema = EMA(named_trainable(trained), cfg.train.ema_decay)
    return LoopSettings(steps=cfg.train.steps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                        max_grad_norm=cfg.train.max_grad_norm, save_every=cfg.train.save_every,
                        keep_checkpoints=cfg.train.keep_checkpoints, precision=cfg.train.precision,
                        min_snr_gamma=cfg.train.min_snr_gamma, ema=ema)


@dataclass
class RunResult:
    """A finished DreamBooth or text-to-image run."""
    run_dir: Path
    weights: Path
    before: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt → (N, C, H, W) in [0, 1]
    after: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


@dataclass
class Trained:
    rows: list[dict]
    seconds: float
    weights: Path
    trainable: int
    total: int


def train_and_save(session: Session, next_batch, generator: torch.Generator, label: str, prompts: list[str],
                   resume: bool, quiet: bool) -> Trained:
    """Make the configured parts trainable, train, save (LoRA file or pipeline folder; the EMA weights when kept)."""
    from tunesmith.diffusion import kohya, saving, trainable
    from tunesmith.methods.base import count_parameters

    cfg, pipe, family = session.cfg, session.pipe, session.family
    torch.manual_seed(cfg.seed)  # LoRA's init and dropout: the same whether or not the model was just pretrained here
    trained = trainable.apply(family, pipe, cfg.method)
    checkpointing = cfg.train.gradient_checkpointing
    if checkpointing or (checkpointing is None and session.device.type == "cuda"):
        family.denoiser_module(pipe).enable_gradient_checkpointing()
    counts = [count_parameters(m) for m in trained.values()]
    settings = settings_of(cfg, trained)
    ema = settings.ema
    every = cfg.sample.every

    def on_step(row, progress, task):
        progress.update(task, completed=row["step"], description=f"{label} loss {row['loss']:.4f}")
        if every and row["step"] % every == 0 and row["step"] < cfg.train.steps:
            trainable.set_train_mode(trained, False)
            with (ema.swapped() if ema is not None else nullcontext()):
                session.save_grid(f"samples/step-{row['step']:06d}.png",
                                  session.render(prompts, cfg.sample.per_prompt, cfg.sample.seed))
            trainable.set_train_mode(trained, True)

    started = time.perf_counter()
    with bar(quiet) as progress:
        task = progress.add_task(label, total=cfg.train.steps)
        if resume:
            saved = checkpoint.list_checkpoints(session.run_dir)
            progress.update(task, completed=int(saved[-1].name.split("-")[1]) if saved else 0)
        rows = train(settings, family, pipe, session.noising, trained, next_batch, generator, session.run_dir,
                     resume=resume, on_step=lambda r: on_step(r, progress, task))
    seconds = time.perf_counter() - started
    plot_losses(session.run_dir, "denoising loss (mean squared error)")
    if ema is not None:
        ema.copy_to()  # what is saved and sampled from here on: the averaged weights
    if cfg.method.name == "lora":
        weights = saving.save_lora(session.run_dir / "lora", family, trained, cfg.method,
                                   kohya.file_name(session.run_dir)).parent
    else:
        weights = saving.save_full(session.run_dir / "pipeline", family, pipe)
    return Trained(rows, seconds, weights, sum(c[0] for c in counts), sum(c[1] for c in counts))


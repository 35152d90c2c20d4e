"""The peak memory of a DreamBooth or text-to-image run, without reading weights (`tunesmith plan CONFIG`).

The pipeline is instantiated on the meta device from its component configs (simulate.py) and its parameters counted;
trainable.apply makes the configured parts trainable on it, as the run does. The run passes through phases, each
holding what stays resident by then plus that phase's transient tensors, and the peak is the largest:
  loading        the components' weights (fp32, as every family loads them);
  class images   DreamBooth's prior: the class images generated train.batch_size at a time (guidance doubles the batch);
  encoding       each image's VAE posterior cached once (train.batch_size images at a time) — or, without caching, every step;
  sampling       the before/after grids (sample.per_prompt per prompt);
  training       the trainable parameters' gradients and AdamW's two moments (+ the EMA's copy), the saved
                 activations at the batch and resolution, the backward's workspace: replayed on fake tensors
                 (simulate.py), so the bytes are those torch allocates, not a formula's.
Resident data: DreamBooth keeps the instance and class images as pixels and their cached posteriors (mean and std);
text-to-image keeps each image's posterior per flip at its aspect bucket's size (pixels without a VAE).

On CPU the figure is peak RSS: the runtime (what a run on a negligible pipeline holds: runtime_probe.py, measured
once per machine through plan/runtime.py) plus the parts, the transient tensors scaled by CPU_TRANSIENT_RSS (glibc
keeps freed blocks, and the holes a forward leaves are not all refilled: bench/diffusion_plan.py measures it). On
CUDA it is peak allocated memory, under bf16 autocast and gradient checkpointing where the run turns them on there
(precision auto, gradient_checkpointing unset): unvalidated, no GPU has measured it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import ModelError
from tunesmith.plan.memory import Part

# Peak RSS over the simulated transient bytes (activations, the backward's and the samplers' workspace), on CPU: glibc
# keeps freed blocks and the holes a forward leaves are not all refilled. bench/diffusion_plan.py (AMD EPYC Zen 4, fam
# 25): (measured − runtime − resident − moments − gradients) / simulated was 1.36, 1.38 and 1.38 on the three 64×64
# UNet rows (DreamBooth LoRA and full, text-to-image full), where activations are most of the peak; the wide-UNet and
# tiny rows were not used to choose it.
CPU_TRANSIENT_RSS = 1.37
DIFFUSION_PROBE = "from tunesmith.diffusion.runtime_probe import main; main()  # runtime_probe.VERSION 1"


@dataclass
class ComponentCount:
    name: str
    class_name: str
    parameters: int
    trainable: int
    bytes: int       # parameters and buffers as loaded
    added: int = 0   # LoRA's parameters in it


@dataclass
class Phase:
    name: str
    parts: list[Part]

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)


@dataclass
class DiffusionPlan:
    kind: str                      # "dreambooth" | "text-to-image"
    model: str
    family: str
    device: str
    method: str
    resolution: tuple[int, int]    # pixels trained (w, h): the largest bucket used
    latent: tuple[int, int, int]   # what the denoiser denoises per image (c, h, w)
    rows: int                      # images per training step
    components: list[ComponentCount]
    runtime: Part
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(c.trainable for c in self.components)

    @property
    def total(self) -> int:
        return sum(c.parameters for c in self.components)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: p.total).name

    @property
    def peak(self) -> int:
        return self.runtime.bytes + max(p.total for p in self.phases)


def model_folder(name: str) -> Path:
    """The pipeline folder, never pretraining or downloading: builtin:tiny-digits must be cached already."""
    if name.startswith("builtin:"):
        from tunesmith.diffusion import tiny

        if name != f"builtin:{tiny.NAME}":
            raise ModelError(f"model: unknown builtin {name!r}; the embedded diffusion model is builtin:{tiny.NAME}")
        if not (tiny.folder() / "model_index.json").is_file():
            raise ModelError(f"model: {name} is not pretrained yet ({tiny.folder()} is missing); `tunesmith "
                             "dreambooth --demo` pretrains it once, then the planner reads its configs")
        return tiny.folder()
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model: {name} is not a folder; expected a diffusers pipeline folder")
    return folder


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _images_in(folder: Path) -> int:
    from tunesmith.diffusion.images import SUFFIXES

    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES) if folder.is_dir() else 0


def _mib_f(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@dataclass
class _Data:
    """What a run keeps of its images, and the shapes its steps see."""
    pixels: list[Part]
    cache: list[Part]
    bucket: tuple[int, int]            # (w, h) pixels of the largest training batch
    encode_images: int                 # images the VAE encodes at once while caching (0: no caching phase)
    encode_every_step: bool
    class_images: int                  # DreamBooth's generated class images (0: none)
    prompts: list[str]
    micro: bool
    notes: list[str]


def _latent_shape(family, pipe, w: int, h: int) -> tuple[int, int, int]:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return family.channels(pipe), h, w
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(vae.config.latent_channels), h // scale, w // scale


def _dreambooth_data(cfg, family, pipe, folder: Path) -> _Data:
    from tunesmith.diffusion.run import instance_folder

    side = family.resolution(pipe)
    channels = family.channels(pipe)
    vae = getattr(pipe, "vae", None)
    c, h, w = _latent_shape(family, pipe, side, side)
    images_folder = instance_folder(cfg, folder)
    n = _images_in(images_folder)
    if n == 0:
        raise ModelError(f"instance.images: {images_folder} holds no images the planner can count")
    prior = cfg.prior.num_images if cfg.prior.weight > 0 else 0
    pixel = channels * side * side * 4
    pixels = [Part("instance images", n * pixel, f"{n} × {channels}×{side}×{side} × 4 B, kept as read")]
    if prior:
        pixels.append(Part("class images", prior * pixel, f"{prior} × {channels}×{side}×{side} × 4 B, kept as read"))
    if vae is None:
        cache = [Part("instance pixels in [-1, 1]", n * pixel, "the denoiser's inputs (pixel space)")]
        if prior:
            cache.append(Part("class pixels in [-1, 1]", prior * pixel, "the denoiser's inputs (pixel space)"))
    else:
        one = 2 * c * h * w * 4
        cache = [Part("instance posteriors", n * one, f"{n} × mean and std {c}×{h}×{w} × 4 B")]
        if prior:
            cache.append(Part("class posteriors", prior * one, f"{prior} × mean and std {c}×{h}×{w} × 4 B"))
    rows = cfg.train.batch_size * (2 if prior else 1)
    bs = cfg.train.batch_size
    prompts = [cfg.instance.prompt] * bs + [cfg.prior.class_prompt or ""] * (rows - bs)
    return _Data(pixels, cache, (side, side), min(cfg.train.batch_size, max(n, prior)) if vae is not None else 0, False,
                 prior, prompts, False, [f"{n} instance images in {images_folder}"])


def _text_to_image_data(cfg, family, pipe) -> _Data:
    from tunesmith.diffusion import buckets as bucketing
    from tunesmith.diffusion.captions import read_captioned_folder

    images = cfg.data.images
    if images.startswith("builtin:"):
        from tunesmith.diffusion.style_demo import data_folder

        images = str(data_folder(images))
    records = read_captioned_folder(images, cfg.data.caption_column, cfg.data.caption_extension, warn=lambda _m: None)
    resolution, multiple = family.resolution(pipe), family.pixel_multiple(pipe)
    if cfg.data.bucketing:
        buckets = bucketing.make_buckets(resolution, multiple, cfg.data.max_aspect)
    else:
        side = resolution - resolution % multiple
        buckets = [(side, side)]
    assignment = bucketing.assign_buckets([r.size for r in records], buckets)
    used = sorted({buckets[b] for b in assignment}, key=lambda s: s[0] * s[1])
    vae = getattr(pipe, "vae", None)
    cached = cfg.data.cache_latents and not cfg.data.random_crop
    flips = 2 if cfg.data.random_flip else 1
    per_image = []
    for b in assignment:
        c, h, w = _latent_shape(family, pipe, *buckets[b])
        per_image.append((c * h * w * 4 * (2 if vae is not None else 1)) * flips)
    what = "posterior mean and std" if vae is not None else "pixels"
    cache = [Part("cached " + ("posteriors" if vae is not None else "images"), sum(per_image),
                  f"{len(records)} images × {flips} flip(s), {what} at each one's bucket, × 4 B")] if cached else []
    # a batch holds batch_size images of one bucket (all of it when it holds fewer): the largest batch in pixels
    batches = {s: min(cfg.train.batch_size, assignment.count(buckets.index(s))) for s in used}
    largest = max(used, key=lambda s: (batches[s] * s[0] * s[1], s[0] * s[1]))
    rows = batches[largest]
    notes = [f"{len(records)} captioned images in {images}; buckets used (w×h): "
             + ", ".join(f"{w}×{h}" for w, h in used) + f"; the step simulated at {rows} × {largest[0]}×{largest[1]}"]
    prompts = [r.caption for r in records[:rows]] + [""] * max(0, rows - len(records))
    encode = min(cfg.train.batch_size, len(records)) if cached and vae is not None else 0
    return _Data([], cache, largest, encode, not cached and vae is not None, 0, prompts[:rows] or [""] * rows,
                 True, notes)


def _runtime(device: str) -> Part:
    if device != "cpu":
        return Part("runtime", 0, "the CUDA context is outside torch's allocated count")
    from tunesmith.plan.runtime import runtime_overhead

    return Part("runtime", runtime_overhead(DIFFUSION_PROBE),
                "a DreamBooth run on a negligible pipeline, measured once (runtime_probe.py)")


def counted_pipeline(folder: Path, family, method):
    """(meta pipeline, its module components' names, the trained modules, per-component counts): every component
    from its config on the meta device, frozen as the family loads it, then trainable.apply with `method`."""
    from tunesmith.diffusion import simulate, trainable
    from tunesmith.diffusion.families.base import freeze

    components = simulate.meta_components(folder)
    pipe = simulate.meta_pipeline(folder, components)
    names = [n for n, c in components.items() if isinstance(c.module, torch.nn.Module)]
    base = {n: sum(p.numel() for p in components[n].module.parameters()) for n in names}
    freeze(*(components[n].module for n in names))
    trained = trainable.apply(family, pipe, method)
    counts = []
    for n in names:
        module = components[n].module
        total = sum(p.numel() for p in module.parameters())
        counts.append(ComponentCount(n, components[n].class_name, total,
                                     sum(p.numel() for p in module.parameters() if p.requires_grad), _bytes(module),
                                     total - base[n]))
    return pipe, names, trained, counts


def plan_diffusion(cfg, device: str = "cpu") -> DiffusionPlan:
    """The plan of `cfg` (a DreamBoothConfig or TextToImageConfig) on 'cpu' (peak RSS) or 'cuda' (peak allocated)."""
    from tunesmith.diffusion import simulate
    from tunesmith.diffusion.families import detect
    from tunesmith.diffusion.session import usual_guidance

    kind = "dreambooth" if hasattr(cfg, "instance") else "text-to-image"
    folder = model_folder(cfg.model)
    family = detect(folder)
    pipe, module_names, trained, counts = counted_pipeline(folder, family, cfg.method)
    lora_added = sum(c.added for c in counts)
    if kind == "dreambooth":
        data = _dreambooth_data(cfg, family, pipe, folder)
    else:
        data = _text_to_image_data(cfg, family, pipe)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device == "cuda")
    checkpointing = cfg.train.gradient_checkpointing
    if checkpointing is None:
        checkpointing = device == "cuda"
    if checkpointing:
        family.denoiser_module(pipe).enable_gradient_checkpointing()
    w, h = data.bucket
    latent = _latent_shape(family, pipe, w, h)
    rows = len(data.prompts)
    run = simulate.FakeRun(pipe, module_names)
    micro = [[h, w, 0, 0, h, w]] * rows if data.micro else None
    step = simulate.training_step(run, family, trained, rows, latent, data.prompts, micro, bf16,
                                  foreach=True if device == "cuda" else None)
    seen: dict = {}
    transient = CPU_TRANSIENT_RSS if device == "cpu" else 1.0
    scaled = f" × {CPU_TRANSIENT_RSS} (CPU_TRANSIENT_RSS)" if device == "cpu" and transient != 1.0 else ""

    weights = Part("weights", sum(c.bytes for c in counts), "every component's parameters and buffers as loaded: "
                   + ", ".join(f"{c.name} {_mib_f(c.bytes)}" for c in counts))
    trainable_count = sum(c.trainable for c in counts)
    kept = [weights, *data.pixels]
    # loading holds the weights alone: diffusers and transformers fill meta-initialised modules with the file's
    # tensors, no second copy (the wide UNet's row in bench/diffusion_plan.py: 1.7 GiB of weights, +0.1 GiB)
    phases = [Phase("loading", [weights])]
    guidance_for = getattr(cfg.sample, "guidance_scale", None)
    grid_rows = cfg.sample.per_prompt * (2 if usual_guidance(cfg.model, family, guidance_for) > 1 else 1)
    if data.class_images:
        k = min(cfg.train.batch_size, data.class_images)
        k_rows = k * (2 if usual_guidance(cfg.model, family, cfg.prior.guidance_scale) > 1 else 1)
        made = data.class_images * family.channels(pipe) * w * h * 4
        phases.append(Phase("class images", [weights, data.pixels[0], Part(
            "class images made", 2 * made, "the rendered images and their PNGs read back"),
            _sampling_part(run, family, pipe, k_rows, k, latent, transient, scaled, seen)]))
    if data.encode_images:
        vae = pipe.vae
        pixels = torch.Size((data.encode_images, family.channels(pipe), h, w))
        peak = simulate.no_grad_peak(run, lambda: vae.encode(torch.randn(pixels, device=run.device)))
        phases.append(Phase("encoding", [*kept, Part("VAE encoding", int(peak * transient),
                                                     f"{data.encode_images} images at once{scaled}")]))
    kept = kept + data.cache
    phases.append(Phase("sampling", [*kept, _sampling_part(run, family, pipe, grid_rows, cfg.sample.per_prompt,
                                                           latent, transient, scaled, seen)]))
    optimizer_state = step["moments"]
    ema = trainable_count * 4 if cfg.train.ema_decay else 0
    training = [*kept, Part("AdamW moments", optimizer_state, f"2 × {trainable_count:,} trainable × 4 B (and the "
                            "cached text conditioning), as AdamW made them in the simulated step")]
    if ema:
        training.append(Part("EMA copy", ema, f"{trainable_count:,} × 4 B"))
    gradients = sum(p.numel() * p.element_size() for m in trained.values() for p in m.parameters() if p.requires_grad)
    training.append(Part("gradients", gradients, f"{trainable_count:,} trainable parameters' gradients"))
    backward = step["backward"] + optimizer_state
    peak_step = max(backward, step["optimizer step"])
    where = "step 2's backward" if backward >= step["optimizer step"] else "the optimizer step"
    training.append(Part("activations, workspace", int(max(0, peak_step - optimizer_state - gradients) * transient),
                         f"{rows} images × {latent[0]}×{latent[1]}×{latent[2]} at {w}×{h} px, "
                         f"{'bf16 autocast' if bf16 else 'fp32'}, gradient checkpointing "
                         f"{'on' if checkpointing else 'off'}; the high-water mark of {where}, simulated{scaled}"))
    phases.append(Phase("training", training))
    if data.encode_every_step:  # before each forward, while the moments (and the EMA) are held
        pixels = torch.Size((rows, family.channels(pipe), h, w))
        peak = simulate.no_grad_peak(run, lambda: pipe.vae.encode(torch.randn(pixels, device=run.device)))
        phases.append(Phase("encoding each step", [*training[:len(kept) + 1 + bool(ema)], Part(
            "VAE encoding", int(peak * transient), "latents not cached (random_crop or cache_latents false): "
            f"{rows} images encoded before each forward{scaled}")]))
    notes = list(data.notes)
    if lora_added:
        notes.append(f"LoRA adds {lora_added:,} parameters (fp32)")
    if device != "cpu":
        notes.append("the CUDA figures are unvalidated: no GPU has measured them (simulated on CPU fake tensors under "
                     "bf16 autocast; AdamW's foreach temporaries counted)")
    return DiffusionPlan(kind, cfg.model, family.name, device, cfg.method.name, (w, h), latent, rows, counts,
                         _runtime(device), phases, notes)


def _sampling_part(run, family, pipe, unet_rows: int, images: int, latent, transient: float, scaled: str,
                   seen: dict) -> Part:
    """One no-grad denoiser call at `unet_rows` (classifier-free guidance doubles it) or the VAE's decode of
    `images`, whichever holds more (`seen` keeps the peaks already simulated)."""
    from tunesmith.diffusion import simulate

    c, h, w = latent
    key = (unet_rows, images)
    if key not in seen:
        def denoise():
            text = family.encode_text(pipe, [""] * unet_rows)
            noisy = torch.randn(unet_rows, c, h, w, device=run.device)
            family.predict(pipe, noisy, torch.full((unet_rows,), 500, device=run.device), text)

        peak, how = simulate.no_grad_peak(run, denoise), f"the denoiser on {unet_rows} rows"
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            decode = simulate.no_grad_peak(run, lambda: vae.decode(torch.randn(images, c, h, w, device=run.device)))
            if decode > peak:
                peak, how = decode, f"the VAE decoding {images} images"
        seen[key] = peak, how
    peak, how = seen[key]
    return Part("sampling", int(peak * transient), f"{how}, no grad{scaled}")

"""The DreamBooth run configuration: YAML validated by pydantic; unknown keys and wrong types name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith.config import load_yaml_model
from tunesmith.paths import Expect

DEMO_MODEL = "builtin:tiny-digits"
RUN_FOLDER_HELP = ("the run folder for the trained weights, config.yaml, the sample grids and checkpoints; one that "
                   "holds files needs --overwrite or --resume")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InstanceSettings(Strict):
    images: Annotated[str, Expect.FOLDER] = Field(
        description="folder of 3-20 images of the subject (png, jpg, jpeg, bmp, webp)")
    prompt: str = Field(description="the prompt naming the subject by its identifier, e.g. 'a photo of sks dog'")
    identifier: str = Field("sks", min_length=1, description="the rare token bound to the subject")


class PriorSettings(Strict):
    class_prompt: str | None = Field(None, description="the subject's class without the identifier, e.g. 'a photo "
                                     "of a dog'; required when weight > 0")
    weight: float = Field(1.0, ge=0, description="weight of the prior-preservation term; 0 turns it off")
    num_images: int = Field(50, gt=0, description="class images the base pipeline generates before training "
                            "(cached in the run folder)")
    steps: int = Field(25, gt=0, description="sampling steps for the class images")
    guidance_scale: float | None = Field(None, ge=1.0, description="classifier-free guidance for the class images; "
                                         "default: the pipeline's usual (SD 7.5, SDXL 5, SD3 7, Flux 3.5)")


class MethodSettings(Strict):
    name: Literal["lora", "full"] = Field("lora", description="lora: low-rank pairs on the denoiser's target layers; "
                                          "full: every weight of the denoiser trains")
    r: int = Field(8, gt=0, description="lora: the rank of each pair B·A")
    alpha: float = Field(8.0, gt=0, description="lora: the update B·A·x is scaled by alpha/r")
    dropout: float = Field(0.0, ge=0, lt=1, description="lora: dropout on the input of the low-rank branch while "
                           "training; 0: none")
    target_modules: list[str] | None = Field(None, description="denoiser (UNet / transformer) linear layers LoRA "
                                             "wraps, as module-name suffixes; default: the pipeline's attention "
                                             "projections (as diffusers' LoRA training scripts)")
    train_text_encoder: bool = Field(False, description="also train the CLIP text encoder(s) (LoRA on "
                                     "text_target_modules with method lora, all of it with full); T5 never trains")
    text_target_modules: list[str] | None = Field(None, description="text-encoder layers LoRA wraps; default: "
                                                  "the attention projections")


class TrainSettings(Strict):
    steps: int = Field(200, gt=0, description="optimizer steps to train")
    batch_size: int = Field(4, gt=0, description="instance images per step (and as many class images)")
    lr: float = Field(1e-4, gt=0, description="AdamW's learning rate, constant over the run")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay; 0: none")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradients' global L2 norm to this before "
                                        "each step; null: no clipping")
    save_every: int | None = Field(None, gt=0, description="checkpoint every N steps (for --resume)")
    keep_checkpoints: int = Field(2, gt=0, description="how many of the newest checkpoints the run keeps")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where the run trains: auto is CUDA, else Apple's MPS, else the CPU")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on a GPU that has "
                                                       "it, fp32 elsewhere")
    gradient_checkpointing: bool | None = Field(None, description="recompute the denoiser's activations in the "
                                                "backward pass; default: on on a GPU, off on the CPU")
    threads: int | None = Field(None, gt=0, description="torch's CPU threads for the run; null: torch's default")
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR-γ loss weighting (5 is the paper's "
                                        "choice); off by default")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average of the "
                                    "trained weights (e.g. 0.999) and save and sample with it; off by default")
    guidance_embedding: float = Field(1.0, gt=0, description="the guidance value a guidance-distilled transformer "
                                      "(Flux-dev) is given while training (diffusers' Flux examples train at 1)")


class SampleSettings(Strict):
    prompts: list[str] = Field(default_factory=list, description="grid rows (default: the instance prompt and the "
                               "class prompt)")
    per_prompt: int = Field(4, gt=0, description="images per prompt in each grid row")
    steps: int = Field(25, gt=0, description="denoising steps of each grid image")
    guidance_scale: float | None = Field(None, ge=1.0, description="classifier-free guidance; 1 = none; default: the "
                                         "pipeline's usual (SD 7.5, SDXL 5, SD3 7, Flux 3.5)")
    seed: int = Field(1234, description="seed of the grids' starting noise, the same before and after training so "
                      "that the grids compare")
    every: int | None = Field(None, gt=0, description="also render the grid every N training steps "
                              "(samples/step-N.png), with the EMA weights when train.ema_decay is set")


class DiffusionRunConfig(Strict):
    """What DreamBooth and text-to-image runs share."""
    model: Annotated[str, Expect.MODEL] = Field(
        DEMO_MODEL, description="a diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux) or "
        "builtin:tiny-digits")
    output_dir: Annotated[str, Expect.OUT_FOLDER] = Field("runs/dreambooth", description=RUN_FOLDER_HELP)
    seed: int = Field(0, description="seed of the training noise and timesteps (and of DreamBooth's class images); "
                      "the grids use sample.seed")
    method: MethodSettings = Field(default_factory=MethodSettings, description="what trains: LoRA on the denoiser "
                                   "(and optionally the text encoder) or the whole denoiser")
    train: TrainSettings = Field(default_factory=TrainSettings, description="the optimisation: its length, batch, "
                                 "learning rate, precision, checkpoints and device")
    sample: SampleSettings = Field(default_factory=SampleSettings, description="the sample grids rendered before and "
                                   "after training (samples_before.png, samples_after.png)")


class DreamBoothConfig(DiffusionRunConfig):
    instance: InstanceSettings = Field(description="the subject: its images and the prompt that names it")
    prior: PriorSettings = Field(default_factory=PriorSettings, description="prior preservation: images of the "
                                 "subject's class from the base model, trained on beside the subject so the class "
                                 "keeps its look")

    @model_validator(mode="after")
    def _class_prompt_when_weighted(self) -> "DreamBoothConfig":
        if self.prior.weight > 0 and not self.prior.class_prompt:
            raise ValueError("prior.class_prompt is required while prior.weight > 0 (set prior.weight: 0 to train "
                             "without prior preservation)")
        return self

    def grid_prompts(self) -> list[str]:
        if self.sample.prompts:
            return list(self.sample.prompts)
        return [self.instance.prompt] + ([self.prior.class_prompt] if self.prior.class_prompt else [])


def _images_beside(path, section: str):
    """A `section.images` folder named relative to the config file is found beside it."""
    if path is None:
        return None

    def adjust(tree: dict, _pairs) -> None:
        part = tree.get(section)
        images = part.get("images") if isinstance(part, dict) else None
        if isinstance(images, str) and not Path(images).is_absolute() and not Path(images).exists():
            beside = Path(path).parent / images
            if beside.exists():
                part["images"] = str(beside)

    return adjust


class DataSettings(Strict):
    images: Annotated[str, Expect.FOLDER] = Field(
        description="a captioned image folder: metadata.jsonl (file_name, text), metadata.csv / captions.csv, or a "
        ".txt beside each image (diffusion/captions.py)")
    caption_column: str = Field("text", min_length=1, description="the caption field of the metadata rows")
    caption_extension: str = Field(".txt", min_length=1, description="caption files beside the images")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="probability of training a caption as \"\" (so "
                                   "classifier-free guidance keeps working)")
    bucketing: bool = Field(True, description="train each image at the aspect bucket nearest its own (about the "
                            "model's pixel count) instead of cropping it square")
    max_aspect: float = Field(2.0, ge=1, description="the widest bucket's long side / short side")
    random_crop: bool = Field(False, description="crop at a random offset (else centred); turns latent caching off")
    random_flip: bool = Field(False, description="flip left-right with probability 1/2")
    cache_latents: bool = Field(True, description="encode each image's VAE posterior once (both flips when "
                                "random_flip) instead of at every step; off with random_crop")


class TextToImageConfig(DiffusionRunConfig):
    output_dir: Annotated[str, Expect.OUT_FOLDER] = Field("runs/text-to-image", description=RUN_FOLDER_HELP)
    data: DataSettings = Field(description="the captioned images to train on and how they are read")

    def grid_prompts(self, captions: list[str]) -> list[str]:
        """sample.prompts, else the first two distinct non-empty captions."""
        if self.sample.prompts:
            return list(self.sample.prompts)
        return list(dict.fromkeys(c for c in captions if c))[:2]


def load_text_to_image_config(path: str | Path | None, overrides: list[str] | None = None,
                              base: dict | None = None) -> TextToImageConfig:
    return load_yaml_model(TextToImageConfig, path, overrides, base, sections="model, data, method, train, sample",
                           adjust=_images_beside(path, "data"), anchors="text-to-image")


def load_dreambooth_config(path: str | Path | None, overrides: list[str] | None = None,
                           base: dict | None = None) -> DreamBoothConfig:
    """Read YAML (or start from `base`), apply `key.sub=value` overrides, validate."""
    return load_yaml_model(DreamBoothConfig, path, overrides, base,
                           sections="model, instance, prior, method, train, sample",
                           adjust=_images_beside(path, "instance"), anchors="dreambooth")


def dump(cfg: DiffusionRunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

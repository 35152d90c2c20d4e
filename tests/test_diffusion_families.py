"""SDXL, SD3 and Flux pipelines (tunesmith/diffusion/families/) on tiny random models of each (diffusion_pipelines.py):
one training step's loss equals a diffusers training script's step computed with the pipeline's components directly;
DreamBooth (LoRA on the denoiser and the CLIP text encoders) and text-to-image (LoRA on two aspect buckets) train,
and the saved LoRA loads through diffusers' own `load_lora_weights` and renders the images tunesmith renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_pipelines import KINDS, RES, build_pipeline_folder
from test_dreambooth import write_images

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
PROMPTS = ["a photo of sks dog", "a dog on the grass"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: build_pipeline_folder(tmp_path_factory.mktemp(kind), kind) for kind in KINDS}


# --- the oracle: one step of diffusers' train_dreambooth_lora_{sdxl,sd3,flux}.py, written out ---------------------

def clip_states(tokenizer, encoder, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids, output_hidden_states=True)


def t5_states(tokenizer, encoder, prompts, length):
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return encoder(ids)[0]


def diffusers_step_loss(kind, pipe, scheduler, pixels, prompts, micro, latent_seed, step_seed, guidance):
    """The scripts' loss for the batch: latents from the VAE's posterior, noise and timestep indices from
    `step_seed` (noise first), the scripts' own prompt encoding, conditioning and targets (prediction MSE); Flux's
    guidance embedding at `guidance` (--guidance_scale)."""
    vae = pipe.vae
    model_input = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(latent_seed))
    model_input = (model_input - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    g = torch.Generator().manual_seed(step_seed)
    noise = torch.randn(model_input.shape, generator=g)
    indices = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=g)
    if kind == "sdxl":
        one, two = clip_states(pipe.tokenizer, pipe.text_encoder, prompts), clip_states(pipe.tokenizer_2,
                                                                                         pipe.text_encoder_2, prompts)
        embeds = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        noisy = scheduler.add_noise(model_input, noise, indices)
        time_ids = torch.tensor(micro, dtype=torch.float32)  # original size + crop top-left + target size
        pred = pipe.unet(noisy, indices, embeds, added_cond_kwargs={"text_embeds": two[0], "time_ids": time_ids}).sample
        return torch.nn.functional.mse_loss(pred, noise)
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    target = noise - model_input
    if kind == "sd3":
        one, two = clip_states(pipe.tokenizer, pipe.text_encoder, prompts), clip_states(pipe.tokenizer_2,
                                                                                         pipe.text_encoder_2, prompts)
        t5 = t5_states(pipe.tokenizer_3, pipe.text_encoder_3, prompts, pipe.tokenizer_3.model_max_length)
        clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pred = pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=torch.cat([clip, t5], 1),
                                pooled_projections=torch.cat([one[0], two[0]], dim=-1)).sample
        return torch.nn.functional.mse_loss(pred, target)
    from diffusers import FluxPipeline

    pooled = clip_states(pipe.tokenizer, pipe.text_encoder, prompts).pooler_output
    t5 = t5_states(pipe.tokenizer_2, pipe.text_encoder_2, prompts, pipe.tokenizer_2.model_max_length)
    n, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
    pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.full((n,), guidance),
                            pooled_projections=pooled, encoder_hidden_states=t5, txt_ids=torch.zeros(t5.shape[1], 3),
                            img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, CPU, noisy.dtype)).sample
    pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)
    return torch.nn.functional.mse_loss(pred, target)


@pytest.mark.parametrize("kind", KINDS)
def test_one_training_step_has_the_loss_of_diffusers_training_script(kind, folders, tmp_path):
    from tunesmith.diffusion import trainable
    from tunesmith.diffusion.components import load_pipeline
    from tunesmith.diffusion.config import MethodSettings, TrainSettings
    from tunesmith.diffusion.loop import Batch, LoopSettings, train
    from tunesmith.diffusion.noise import Noising

    family, pipe, scheduler = load_pipeline(folders[kind], CPU)
    assert family.name == kind and type(pipe).__name__ == family.pipeline_classes[0]
    family = family.configured(TrainSettings(guidance_embedding=2.0))  # Flux's; the others read nothing
    pixels = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(3)) * 2 - 1
    micro = [[20, 24, 2, 4, RES, RES], [RES, RES, 0, 0, RES, RES]]  # (h, w, top, left, h, w): SDXL's size ids
    with torch.no_grad():
        expected = diffusers_step_loss(kind, pipe, scheduler, pixels, PROMPTS, micro, latent_seed=1, step_seed=0,
                                       guidance=2.0).item()
        clean = family.encode_images(pipe, pixels, torch.Generator().manual_seed(1))
    batch = Batch(prompts=PROMPTS, clean=clean, groups={"denoising": (0, 2, 1.0)}, micro=torch.tensor(micro).float())
    trained = trainable.apply(family, pipe, MethodSettings(r=2, alpha=2, train_text_encoder=True))
    rows = train(LoopSettings(steps=1, lr=1e-3), family, pipe, Noising(scheduler), trained, lambda g: batch,
                 torch.Generator().manual_seed(0), tmp_path)
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-7)


# --- DreamBooth and text-to-image runs; their LoRA through diffusers ------------------------------------------------

def run_config(kind, folder, out, **sections):
    tree = {"model": str(folder), "output_dir": str(out), "seed": 0,
            "method": {"name": "lora", "r": 4, "alpha": 8, "train_text_encoder": True},
            "train": {"steps": 2, "batch_size": 1, "lr": 1e-2, "device": "cpu"},
            "sample": {"per_prompt": 1, "steps": 2, "seed": 7, "prompts": PROMPTS[:1], "guidance_scale": 1.0}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return tree


def diffusers_render(folder, kind, lora=None, guidance=1.0):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:  # a LoRA folder (diffusers' file in it) or one file (the kohya single file)
        named = {} if lora.is_file() else {"weight_name": "pytorch_lora_weights.safetensors"}
        pipe.load_lora_weights(str(lora), **named)
    extra = {} if kind == "sdxl" else {"max_sequence_length": pipe.tokenizer.model_max_length}
    return pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(7), height=RES, width=RES,
                output_type="pt", guidance_scale=guidance, **extra).images


def saved_components(weights) -> set[str]:
    from safetensors.torch import load_file

    saved = load_file(str(weights / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # it trained (B starts at zero)
    return {k.split(".", 1)[0] for k in saved}


@pytest.mark.parametrize("kind", KINDS)
def test_dreambooth_lora_loads_through_diffusers_and_renders_our_images(kind, folders, tmp_path):
    from tunesmith.diffusion.config import load_dreambooth_config
    from tunesmith.diffusion.families import by_name
    from tunesmith.diffusion.run import dreambooth
    from tunesmith.diffusion.sample import load_trained

    family = by_name(kind)
    tree = run_config(kind, folders[kind], tmp_path / "run",
                      instance={"images": str(write_images(tmp_path / "subject", n=2, size=RES)),
                                "prompt": PROMPTS[0]},
                      prior={"class_prompt": "a dog", "weight": 0.5, "num_images": 1, "steps": 2,
                             "guidance_scale": 1.0})
    result = dreambooth(load_dreambooth_config(None, base=tree), quiet=True)
    assert result.summary["class_images"] == 1 and len(result.summary["rows"]) == 2
    assert saved_components(result.weights) == {family.denoiser, *family.trainable_text_encoders}
    ours = result.after[PROMPTS[0]]
    theirs = diffusers_render(folders[kind], kind, result.weights)
    assert ours.shape == (1, 3, RES, RES)
    assert (theirs - ours).abs().max().item() < 1e-5
    assert (result.before[PROMPTS[0]] - ours).abs().max().item() > 1e-3  # the adapter matters
    again, pipe = load_trained(result.run_dir, CPU)  # tunesmith's own reload (generate-image)
    mine = again.sample(pipe, PROMPTS[:1], 1, 2, 1.0, torch.Generator().manual_seed(7))
    assert (mine - ours).abs().max().item() < 1e-5
    kohya = list(result.weights.glob("*_kohya.safetensors"))  # the single file: UNet pipelines only
    assert [k.name for k in kohya] == (["run_kohya.safetensors"] if kind == "sdxl" else [])
    if kohya:  # lora_unet_, lora_te1_, lora_te2_: diffusers' loader converts it back
        from safetensors.torch import load_file

        assert {k.split("_")[1] for k in load_file(str(kohya[0]))} == {"unet", "te1", "te2"}
        assert (diffusers_render(folders[kind], kind, kohya[0]) - ours).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Four images, two square and two 2:1 wide, each captioned by a .txt beside it."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(RES, RES), (2 * RES, RES)] * 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {'wide' if w > h else 'square'} picture number {i}")
    return folder


@pytest.mark.parametrize("kind,method", [("sdxl", "lora"), ("sd3", "full"), ("flux", "lora")])
def test_text_to_image_trains_on_aspect_buckets_and_its_weights_load_through_diffusers(kind, method, folders,
                                                                                       captioned, tmp_path):
    from tunesmith.diffusion.config import load_text_to_image_config
    from tunesmith.diffusion.text_to_image import text_to_image

    tree = run_config(kind, folders[kind], tmp_path / "run", data={"images": str(captioned), "max_aspect": 2},
                      method={"name": method, "train_text_encoder": False}, train={"steps": 2, "batch_size": 2})
    result = text_to_image(load_text_to_image_config(None, base=tree), quiet=True)
    assert len(result.summary["buckets"]) == 2  # square and wide
    if method == "lora":
        assert saved_components(result.weights) == {"unet" if kind == "sdxl" else "transformer"}
        theirs = diffusers_render(folders[kind], kind, result.weights)
    else:  # a pipeline folder diffusers loads as it is
        assert (result.weights / "model_index.json").is_file() and not list(result.weights.rglob("*.bin"))
        theirs = diffusers_render(result.weights, kind)
    ours = result.after[PROMPTS[0]]
    assert (theirs - ours).abs().max().item() < 1e-5
    assert (result.before[PROMPTS[0]] - ours).abs().max().item() > 1e-3

def test_a_folder_missing_a_component_its_model_index_names_is_refused_naming_it(folders, tmp_path):
    import shutil

    from tunesmith.diffusion.components import load_pipeline
    from tunesmith.errors import ModelError

    folder = shutil.copytree(folders["sdxl"], tmp_path / "sdxl", ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ModelError, match=r"model_index.json names the component\(s\) text_encoder_2 of a "
                                         r"StableDiffusionXLPipeline, but the folder lacks text_encoder_2/"):
        load_pipeline(folder, CPU)


@pytest.mark.parametrize("kind", KINDS)
def test_the_usual_guidance_is_the_pipelines_own_default(kind):
    import inspect

    import diffusers

    from tunesmith.diffusion.families import by_name

    family = by_name(kind)
    call = getattr(diffusers, family.pipeline_classes[0]).__call__
    assert family.guidance_scale == inspect.signature(call).parameters["guidance_scale"].default

"""The formats diffusion runs ship in, read back by diffusers itself: the kohya/A1111 single-file LoRA beside the
diffusers one (diffusers' `load_lora_weights(file)` detects the kohya keys and converts them back) gives the run's
images; `tunesmith export RUN OUT --format kohya` writes the same file for an existing run; a full fine-tune with a
VAE is a StableDiffusionPipeline folder that `DiffusionPipeline.from_pretrained` samples the run's images from.
Tiny random models (test_dreambooth), 8x8 images."""

from __future__ import annotations

import json

import pytest
import torch

from test_dreambooth import build_model_folder, config, diffusers_pipeline, render, write_images

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    """The tiny VAE folder with the scheduler settings of a real SD folder (steps_offset 1, no sample clipping),
    which diffusers' StableDiffusionPipeline would otherwise rewrite on loading."""
    folder = build_model_folder(tmp_path_factory.mktemp("sd-vae"), vae=True)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "steps_offset": 1, "clip_sample": False}))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("instance") / "images")


def run(model, images, out, **sections):
    from tunesmith.diffusion.run import dreambooth

    sections = {**sections, "prior": {"weight": 0.0}, "sample": {"prompts": [PROMPT]},
                "train": {"steps": 2, **sections.get("train", {})}}
    return dreambooth(config(model, images, out, **sections), quiet=True)


@pytest.fixture(scope="module")
def lora_run(vae_model, images, tmp_path_factory):
    return run(vae_model, images, tmp_path_factory.mktemp("runs") / "my-subject", method={"train_text_encoder": True})


def test_the_kohya_file_holds_the_runs_lora_under_kohya_names(lora_run):
    """kohya names: `.` → `_` in the module path, CLIP's by its checkpoint name (transformers 5 drops text_model.)."""
    from safetensors.torch import load_file

    ours = load_file(str(lora_run.weights / "pytorch_lora_weights.safetensors"))
    kohya = load_file(str(lora_run.weights / "my-subject_kohya.safetensors"))
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"],
                       ours[f"unet.{q}.lora_A.weight"])
    te = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"
    assert torch.equal(kohya[f"{te}.lora_up.weight"],
                       ours["text_encoder.encoder.layers.0.self_attn.out_proj.lora_B.weight"])
    modules = {k.split(".")[0] for k in kohya}
    assert len(kohya) == 3 * len(modules) == 3 * len(ours) // 2  # down, up, alpha for every module
    assert {k.split("_")[1] for k in modules} == {"unet", "te"}
    assert all(kohya[f"{m}.alpha"].item() == 8.0 for m in modules)  # the run's alpha (rank 4): scale 2


def test_the_kohya_file_loads_through_diffusers_with_the_runs_images(lora_run, vae_model):
    pipe = diffusers_pipeline(vae_model)
    base = render(pipe)
    pipe.load_lora_weights(str(lora_run.weights / "my-subject_kohya.safetensors"))
    ours = lora_run.after[PROMPT]
    assert (render(pipe) - ours).abs().max().item() < 1e-5
    assert (base - ours).abs().max().item() > 1e-3  # the adapter matters
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}


def test_export_writes_the_kohya_file_of_an_existing_run(lora_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from tunesmith.cli import main

    out = tmp_path / "exported.safetensors"
    assert main(["export", str(lora_run.run_dir), str(out), "--format", "kohya"]) == 0
    expected = load_file(str(lora_run.weights / "my-subject_kohya.safetensors"))
    got = load_file(str(out))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert main(["export", str(lora_run.weights), str(out), "--format", "kohya"]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err


def test_a_transformer_lora_has_no_kohya_file_and_export_says_why(tmp_path, capsys):
    from safetensors.torch import save_file

    from tunesmith.cli import main
    from tunesmith.diffusion import kohya

    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}
    assert not kohya.supported(tensors)  # SD3, Flux: a run writes the diffusers file only
    (tmp_path / "lora").mkdir()
    save_file(tensors, str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert main(["export", str(tmp_path), str(tmp_path / "out.safetensors"), "--format", "kohya"]) == 2
    assert "no kohya single-file LoRA for transformer.*" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_full_run_with_a_vae_is_a_stable_diffusion_pipeline_folder_diffusers_samples_alike(vae_model, images,
                                                                                                tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

    from tunesmith.diffusion.sample import load_trained

    result = run(vae_model, images, tmp_path / "full", method={"name": "full"}, train={"lr": 1e-3, "steps": 1})
    index = json.loads((result.weights / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False
    pipe = DiffusionPipeline.from_pretrained(result.weights)
    assert type(pipe) is StableDiffusionPipeline and type(pipe.scheduler) is DDIMScheduler
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    assert (theirs - result.after[PROMPT]).abs().max().item() < 1e-5
    family, reloaded = load_trained(result.run_dir, device=torch.device("cpu"))
    assert family.name == "sd" and (render(reloaded) - result.after[PROMPT]).abs().max().item() < 1e-5
    base = UNet2DConditionModel.from_pretrained(vae_model / "unet").state_dict()
    assert any(not torch.equal(base[k], v) for k, v in pipe.unet.state_dict().items())  # it trained

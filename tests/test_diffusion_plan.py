"""`tunesmith plan` on DreamBooth and text-to-image configs (diffusion/plan.py, simulate.py): parameter counts from
the component configs equal the loaded pipeline's, LoRA's trainable count equals what trainable.apply makes
trainable, the fake-tensor replay counts the bytes a real step allocates, the CLI prints each kind, bad configs name
the field. Measured against real runs in bench/diffusion_plan.py, not here."""

from __future__ import annotations

import json
import os

import pytest
import torch

from test_dreambooth import build_model_folder, write_images
from tunesmith.cli import main

os.environ.setdefault("TUNESMITH_RUNTIME_BYTES", str(300 * 2**20))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("sd-vae"), vae=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("instance") / "images")


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8, "train_text_encoder": True},
                                    {"name": "full"}])
def test_counts_from_configs_equal_the_loaded_pipeline_and_what_apply_trains(vae_model, method):
    from tunesmith.diffusion import trainable
    from tunesmith.diffusion.components import load_pipeline
    from tunesmith.diffusion.config import MethodSettings
    from tunesmith.diffusion.plan import counted_pipeline

    settings = MethodSettings(**method)
    family, pipe, _ = load_pipeline(vae_model)
    base = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "text_encoder", "vae")}
    trained = trainable.apply(family, pipe, settings)
    _, _, _, counts = counted_pipeline(vae_model, family, settings)
    by_name = {c.name: c for c in counts}
    assert set(by_name) == {"unet", "text_encoder", "vae"}
    for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae)):
        assert by_name[name].parameters == sum(p.numel() for p in module.parameters())
        assert by_name[name].trainable == sum(p.numel() for p in module.parameters() if p.requires_grad)
        assert by_name[name].added == by_name[name].parameters - base[name]
    assert sum(c.trainable for c in counts) == sum(p.numel() for p in trainable.named_trainable(trained).values())
    if method["name"] == "lora":  # r·(in + out) for each of the UNet's and the text encoder's attention projections
        assert by_name["unet"].trainable == by_name["unet"].added > 0
        assert by_name["vae"].trainable == 0
    else:
        assert by_name["unet"].trainable == by_name["unet"].parameters and by_name["text_encoder"].trainable == 0


def test_counts_of_an_sd3_folder_tie_t5s_embedding_as_loading_does(tmp_path):
    from diffusion_pipelines import build_pipeline_folder
    from tunesmith.diffusion import trainable
    from tunesmith.diffusion.components import load_pipeline
    from tunesmith.diffusion.config import MethodSettings
    from tunesmith.diffusion.plan import counted_pipeline

    folder = build_pipeline_folder(tmp_path / "sd3", "sd3")
    method = MethodSettings(name="lora", r=4, alpha=4, train_text_encoder=True)
    family, pipe, _ = load_pipeline(folder)
    trainable.apply(family, pipe, method)
    counts = {c.name: (c.parameters, c.trainable) for c in counted_pipeline(folder, family, method)[3]}
    assert counts == {name: (sum(p.numel() for p in getattr(pipe, name).parameters()),
                             sum(p.numel() for p in getattr(pipe, name).parameters() if p.requires_grad))
                      for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")}


def test_live_bytes_keep_what_only_autograd_holds():
    """Saved activations and a stolen .grad are alive though no Python name refers to them."""
    from tunesmith.diffusion.simulate import LiveBytes

    x = torch.randn(64, 64, requires_grad=True)
    one = 64 * 64 * 4
    live = LiveBytes()
    with live:
        y = x
        for _ in range(5):
            y = torch.sigmoid(y)  # each output saved for its backward
        assert live.now == 5 * one
        y.sum().backward()
    assert live.now == 2 * one  # y and x.grad
    x.grad = None
    assert live.now == one


def test_fake_replay_counts_the_bytes_a_real_step_allocates(vae_model):
    """The live-byte count over a real forward + backward equals the count over the same step on fake tensors."""
    from tunesmith.diffusion.components import load_pipeline
    from tunesmith.diffusion import trainable
    from tunesmith.diffusion.config import MethodSettings
    from tunesmith.diffusion.loss import per_sample_mse
    from tunesmith.diffusion.plan import counted_pipeline
    from tunesmith.diffusion.simulate import FakeRun, LiveBytes, training_step

    method = MethodSettings(name="lora", r=4, alpha=8)
    family, pipe, _ = load_pipeline(vae_model)
    trained = trainable.apply(family, pipe, method)
    prompts = ["a photo of sks dog", "a photo of a dog"]
    live = LiveBytes()
    with live:
        with torch.no_grad():  # the loop's cached conditioning, as the fake step makes it
            text = family.encode_text(pipe, prompts)
        clean = torch.randn(2, 4, 4, 4)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (2,))
        noisy = clean + noise  # the loop's names: alive through the backward, as in the fake step
        prediction = family.predict(pipe, noisy, timesteps, text)
        per_sample_mse(prediction, noise).mean().backward()
    real = live.peak
    fake_pipe, names, fake_trained, _ = counted_pipeline(vae_model, family, method)
    fake = training_step(FakeRun(fake_pipe, names), family, fake_trained, 2, (4, 4, 4), prompts, None, False, None)
    lora = sum(p.numel() for p in trainable.named_trainable(trained).values())
    assert fake["moments"] >= 2 * lora * 4
    assert fake["backward"] == real
    assert real > 0


def _write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_cli_plans_a_dreambooth_config_with_its_phases(vae_model, images, tmp_path, capsys):
    path = _write(tmp_path, f"model: {vae_model}\ninstance: {{images: {images}, prompt: a photo of sks dog}}\n"
                  "prior: {class_prompt: a photo of a dog, num_images: 4}\ntrain: {batch_size: 2}\n"
                  "sample: {guidance_scale: 3}\n")
    assert main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "dreambooth" and data["images_per_step"] == 4 and data["latent"] == [4, 4, 4]
    phases = {p["name"]: p for p in data["phases"]}
    assert list(phases) == ["loading", "class images", "encoding", "sampling", "training"]
    assert data["peak_bytes"] == data["runtime"]["bytes"] + max(p["bytes"] for p in data["phases"])
    training = {p["name"]: p["bytes"] for p in phases["training"]["parts"]}
    assert training["instance posteriors"] == 3 * 2 * 4 * 4 * 4 * 4   # 3 images × mean and std, 4×4×4, fp32
    assert training["class posteriors"] == 4 * 2 * 4 * 4 * 4 * 4
    assert training["weights"] == sum(c["bytes"] for c in data["parameters"]["components"])
    assert "8 rows" in {p["name"]: p for p in phases["sampling"]["parts"]}["sampling"]["detail"]  # 4 per prompt, CFG


def test_cli_plans_a_text_to_image_config_and_a_budget(vae_model, images, tmp_path, capsys):
    path = _write(tmp_path, f"model: {vae_model}\ndata: {{images: {images}, random_flip: true}}\n"
                  "method: {name: full}\ntrain: {batch_size: 2}\n")
    (images / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"thing {i}"}) + "\n"
                                                   for i in range(3)))
    try:
        assert main(["plan", str(path), "--budget", "64GiB"]) == 0
    finally:
        (images / "metadata.jsonl").unlink()
    out = capsys.readouterr().out
    assert "text-to-image (full)" in out and "fits the budget of 64.00 GiB" in out and "cached posteriors" in out


def test_a_bad_diffusion_config_names_the_field(vae_model, images, tmp_path, capsys):
    path = _write(tmp_path, f"model: {vae_model}\ninstance: {{images: {images}, prompt: p}}\n"
                  "train: {batch_size: 0}\nprior: {weight: 0}\n")
    assert main(["plan", str(path)]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    path = _write(tmp_path, f"model: {tmp_path / 'nowhere'}\ndata: {{images: {images}}}\n")
    assert main(["plan", str(path)]) == 2
    assert "model: " in capsys.readouterr().err

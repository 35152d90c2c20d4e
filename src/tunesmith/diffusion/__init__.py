"""DreamBooth on diffusers UNets: bind an identifier token to a subject from a few images, keep the class prior with a
preservation loss; full fine-tuning or tunesmith's LoRA on the attention projections (tunesmith.methods.lora).

config.py (schema) → components.py (load a diffusers folder) → images.py (instance/class images, grids) →
loss.py (the DreamBooth loss) → loop.py + checkpoint.py (training, resume) → saving.py (diffusers formats) →
run.py (one run end to end, report.md); tiny.py pretrains the embedded default model; fidelity.py measures;
styles.py builds offline restyled-digit and photo-patch captioned sets, style_scores.py scores style, content and domain."""

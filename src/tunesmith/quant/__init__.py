"""Weight-only int4 quantisation of a model's linear layers (round-to-nearest or GPTQ) into a model folder that
`model.path` loads; LoRA then trains on top of the frozen int4 weights."""

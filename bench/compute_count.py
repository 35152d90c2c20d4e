"""What a runner actually ran through the model: token positions computed and their causal context, and the FLOPs.

"Tokens seen" is the sum of the examples' lengths, the same for every runner. "Tokens computed" is the positions the
decoder really ran: padding included where a runner pads, a shared prefix once where tunesmith shares it. The causal
context of a computed position is its position + 1 (the keys it attends to), which is what attention costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ATTENTION_FLOPS = 3 * 4  # per layer, hidden unit and key: QKᵀ and AV (2 + 2) forward, twice that backward


@dataclass
class ComputeCounter:
    tokens: int = 0
    context: int = 0  # Σ over computed positions of (position + 1)

    def add_positions(self, positions) -> None:
        """Computed positions given by their position ids (any shape)."""
        self.tokens += int(positions.numel())
        self.context += int((positions + 1).sum())

    def add_padded(self, rows: int, width: int) -> None:
        """`rows` rows of `width` positions each, padding included (positions 0..width-1)."""
        self.tokens += rows * width
        self.context += rows * width * (width + 1) // 2

    def add_batch(self, batch: dict) -> None:
        """A Hugging Face style batch: its position_ids where it has them, else its padded input_ids."""
        if batch.get("position_ids") is not None:
            self.add_positions(batch["position_ids"])
        else:
            rows, width = batch["input_ids"].shape
            self.add_padded(rows, width)

    def as_dict(self) -> dict:
        return {"tokens_computed": self.tokens, "context_computed": self.context}


def count_tunesmith_decoder(counter: ComputeCounter):
    """Count every decoder pass of tunesmith's language-model objective: the padding-free row (shared prefixes
    once) where the segment-attention path runs, else the collated rows with their padding. Returns the undo."""
    from tunesmith.kernels import segment_attention
    from tunesmith.objectives import lm

    original_hidden, original_row = lm.hidden_states, segment_attention.run_decoder
    ran_row = []

    def run_decoder(model, batch, compiled=False):
        ran_row.append(True)
        counter.add_positions(batch["decoder_positions"])
        return original_row(model, batch, compiled)

    def hidden_states(model, batch, ctx):
        ran_row.clear()
        out = original_hidden(model, batch, ctx)
        if not ran_row:
            counter.add_positions(batch["position_ids"])
        return out

    segment_attention.run_decoder, lm.hidden_states = run_decoder, hidden_states

    def restore() -> None:
        segment_attention.run_decoder, lm.hidden_states = original_row, original_hidden

    return restore


def counting_collator(collate, counter: ComputeCounter):
    def wrapped(rows):
        batch = collate(rows)
        counter.add_batch(batch)
        return batch

    return wrapped


@dataclass
class ModelShape:
    matmul_params: int  # parameters that multiply activations (the input embedding only when tied to the head)
    hidden: int
    layers: int


def model_shape(folder: str | Path) -> ModelShape:
    from safetensors import safe_open

    config = json.loads((Path(folder) / "config.json").read_text())
    matmul_params = 0
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            numel = 1
            for d in f.get_slice(key).get_shape():
                numel *= d
            if "embed_tokens" not in key or config.get("tie_word_embeddings"):
                matmul_params += numel
    return ModelShape(matmul_params, config["hidden_size"], config["num_hidden_layers"])


def training_flops(shape: ModelShape, method: str, tokens: int, context: int) -> float:
    """4N per token for LoRA (no weight gradient for the frozen base), 6N for full fine-tuning, plus causal
    attention forward and backward over each token's context."""
    per_token = 4 if method == "lora" else 6
    return per_token * shape.matmul_params * tokens + ATTENTION_FLOPS * shape.hidden * shape.layers * context


def example_context(lengths: list[int]) -> int:
    """Σ (position + 1) over every position of examples run one by one, unpadded: n(n+1)/2 each."""
    return sum(n * (n + 1) // 2 for n in lengths)

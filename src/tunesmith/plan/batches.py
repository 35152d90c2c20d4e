"""The tokens of the largest micro-batch a run's data forms: read, tokenized and collated as the run does it.

Activations scale with the tokens the decoder computes (packed rows, a prefix that several sequences share — the
chat template's system prompt, a DPO pair's prompt — computed once), the loss's buffers with the positions it scores
(labelled tokens only: DPO never scores the prompt). Without readable data the planner falls back to the bound
batch × max_length (two sequences per pair), every position labelled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class BatchTokens:
    sequences: int  # sequences in the micro-batch (two per pair for DPO and reward)
    decoder: int    # tokens the decoder computes
    positions: int  # positions the decoder's output is laid back onto (padded rows × width)
    labels: int     # positions the loss scores
    source: str


def bound(cfg: RunConfig, why: str = "") -> BatchTokens:
    per_example = 2 if cfg.objective_declaration.pairs else 1
    sequences = cfg.train.batch_size * per_example
    tokens = sequences * cfg.data.max_length
    return BatchTokens(sequences, tokens, tokens, tokens,
                       f"bound: batch {cfg.train.batch_size} × max_length {cfg.data.max_length}"
                       + (" × 2 sequences per example (a pair; KTO: a completion and its KL one)"
                          if per_example == 2 else "") + (f" ({why})" if why else ""))


def _readable(cfg: RunConfig) -> bool:
    sources = [t.train for t in cfg.data.tasks] if cfg.data.tasks else [cfg.data.train]
    files = [f for source in sources for f in (source if isinstance(source, list) else [source])]
    return all(Path(f).expanduser().is_file() for f in files)


def largest_batch(cfg: RunConfig) -> BatchTokens:
    """The data's micro-batch with the most tokens (its `batch_size` longest examples), as the run collates it."""
    samples = cfg.objective_declaration.samples
    if samples or not _readable(cfg):
        return bound(cfg, f"{cfg.objective.upper()} samples its own answers" if samples else "data not read")
    from tunesmith.models import load_tokenizer
    from tunesmith.objectives import objective_of

    objective = objective_of(cfg)
    try:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        with warnings.catch_warnings():  # the run itself warns about the data; the planner stays quiet
            warnings.simplefilter("ignore")
            examples = objective.build_datasets(cfg, tokenizer).train
    except TunesmithError as exc:
        return bound(cfg, f"data not read: {exc}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return batch_of(cfg, objective, examples, pad_id)


def batch_of(cfg: RunConfig, objective, examples: list, pad_id: int) -> BatchTokens:
    """The largest micro-batch of `examples` (the run's tokenized training set), collated by `objective`."""
    if not examples:
        return bound(cfg, "no training examples")
    longest = sorted(examples, key=len, reverse=True)[: cfg.train.batch_size]
    batch = objective.collate(longest, cfg, pad_id)
    positions = batch["input_ids"].numel()
    shared = "decoder_ids" in batch and not cfg.method.declaration.memory.virtual  # those run the padded rows
    decoder = batch["decoder_ids"].numel() if shared else positions
    labels = int((batch["targets"] != -100).sum())
    sequences = len(longest) * (2 if cfg.objective_declaration.pairs else 1)
    return BatchTokens(sequences, decoder, positions, labels,
                       f"data: the {len(longest)} longest of {len(examples):,} training examples, collated as the run "
                       f"does ({decoder:,} tokens computed, {labels:,} labelled)")

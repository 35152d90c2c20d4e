"""What the preference objectives trained on (prompt, chosen, rejected) pairs share: the pair data sets, their
batches (chosen rows first, then rejected), one unit per pair, and the method's own artifact as the saved result.
DPO and the reference-free losses (ORPO, SimPO) add their loss; the reward model keeps its own (a margin column,
a head to save)."""

from __future__ import annotations

import torch

from tunesmith.data.pair_batches import build_pair_datasets, collate_pairs
from tunesmith.objectives.protocol import nothing_to_keep


class PairwiseObjective:
    own_loop = None
    keep_in_run = staticmethod(nothing_to_keep)

    def build_datasets(self, cfg, tokenizer):
        return build_pair_datasets(cfg, tokenizer)

    def collate(self, pairs, cfg, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, cfg.data.packing, cfg.data.max_length, pad_id,
                             share_prefixes=cfg.data.share_prefixes)

    def units(self, pair) -> int:
        return 1

    def save(self, model, method, cfg, folder) -> None:
        method.save(model, cfg.method, folder, cfg.model.path)

"""Text classification: a label head on the causal LM's last hidden state at each text's last real token (read as the
reward head reads it, objectives/heads.py), cross-entropy over the N labels; held-out accuracy and macro-F1.

Metrics are returned as sums over texts, as every objective's are: correct predictions, and per label the true
positives, false positives and false negatives. Averaged over the texts they stay in proportion, so macro-F1 (the
mean over labels of 2·tp / (2·tp + fp + fn)) comes out of the averages exactly. A label that is neither in the
held-out texts nor predicted has no F1 and is left out of the mean (as scikit-learn's f1_score(average="macro")).

The trained artifact (classifier_folder.py): the method's files with the head beside them, and for methods that
merge, a transformers sequence-classification folder `classifier/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config.objectives import ClassifySettings
from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.labelled import build_labelled_datasets, text_ids
from tunesmith.data.pair_batches import collate_sequences
from tunesmith.errors import DataError
from tunesmith.objectives import heads
from tunesmith.objectives.classifier_folder import HEAD_FILE, merged_folder_note, read_info, save_classifier
from tunesmith.objectives.protocol import nothing_to_keep

HEAD_ATTR = "classification_head"  # a submodule of the model (objectives/heads.py says why)
COUNTS = ("tp", "fp", "fn")


def attach_head(model: nn.Module, labels: list[str]) -> nn.Linear:
    return heads.attach_head(model, HEAD_ATTR, len(labels))


def class_logits(model: nn.Module, batch: dict[str, torch.Tensor], ctx: RunContext) -> torch.Tensor:
    """(texts, labels) fp32 logits: the head at each text's last token."""
    return heads.last_token_outputs(model, getattr(model, HEAD_ATTR), batch, ctx)


def confusion_sums(predicted: torch.Tensor, gold: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """`accuracy` (correct predictions) and per label `tp/<label>`, `fp/<label>`, `fn/<label>`: counts over the texts."""
    out = {"accuracy": float((predicted == gold).sum())}
    for i, name in enumerate(labels):
        out[f"tp/{name}"] = float(((predicted == i) & (gold == i)).sum())
        out[f"fp/{name}"] = float(((predicted == i) & (gold != i)).sum())
        out[f"fn/{name}"] = float(((predicted != i) & (gold == i)).sum())
    return out


def macro_f1(metrics: dict[str, float]) -> float:
    """The mean F1 over the labels that occur (as gold or prediction), from confusion_sums' counts (or their means)."""
    scores = []
    for key in metrics:
        if key.startswith("tp/"):
            name = key[3:]
            tp, fp, fn = (metrics[f"{c}/{name}"] for c in COUNTS)
            if tp + fp + fn > 0:
                scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class ClassifyObjective:
    own_loop = None
    keep_in_run = staticmethod(nothing_to_keep)

    def __init__(self, settings: ClassifySettings):
        self.settings = settings
        self.labels: list[str] = list(settings.labels or [])
        self.pad_id: int | None = None

    def build_datasets(self, cfg, tokenizer):
        data, self.labels = build_labelled_datasets(cfg, tokenizer, self.settings.labels)
        return data

    def collate(self, texts, cfg, pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate_sequences(texts, cfg.data.packing, cfg.data.max_length, pad_id, cfg.data.share_prefixes)
        batch["class_labels"] = torch.tensor([t.label for t in texts], dtype=torch.long)
        return batch

    def units(self, text) -> int:
        return 1

    def prepare(self, model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> str:
        self.pad_id = pad_id
        head = attach_head(model, self.labels)
        return (f"label head: {head.out_features} × {head.in_features} on the last token of each text; labels "
                f"{', '.join(self.labels)}; {merged_folder_note(cfg.method)}")

    def loss_sum(self, model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, int, dict]:
        logits = class_logits(model, batch, ctx)
        gold = batch["class_labels"].to(logits.device)
        loss = F.cross_entropy(logits, gold, reduction="sum")
        return loss, int(gold.shape[0]), confusion_sums(logits.detach().argmax(-1), gold, self.labels)

    def compare(self, before: dict, after: dict) -> dict[str, tuple[float, float]]:
        return {"held-out loss": (before["loss"], after["loss"]),
                "held-out accuracy": (before["accuracy"], after["accuracy"]),
                "held-out macro-F1": (macro_f1(before), macro_f1(after))}

    def save(self, model, method, cfg, folder) -> None:
        save_classifier(model, HEAD_ATTR, method, cfg, folder, self.labels, self.pad_id)


def load_classifier(folder, base: str | None = None, dtype: str = "float32", trust_remote_code: bool = False):
    """(model with its label head, tokenizer, classifier.json, context: the adapter's virtual tokens, if any) of a
    run's adapter/ or model/ folder."""
    folder = Path(folder)
    model, tokenizer, ctx = heads.load_trained(folder, base, dtype, trust_remote_code, "classifier")
    info = read_info(folder)
    heads.read_head(folder / HEAD_FILE, model, HEAD_ATTR, len(info["labels"]), "a classifier")
    return model.eval(), tokenizer, info, ctx


@torch.no_grad()
def text_logits(model: nn.Module, tokenizer, texts: list[str], info: dict, ctx: RunContext, batch_size: int = 8
                ) -> torch.Tensor:
    """(texts, labels) logits of a loaded classifier (`info`, `ctx` as load_classifier gives), each text tokenized
    as in training."""
    device = next(model.parameters()).device
    seqs = []
    for i, text in enumerate(texts):
        ids = text_ids(tokenizer, text, info["max_length"], info["pad_token_id"])
        if not ids:
            raise DataError(f"text {i + 1}: nothing but the pad token once tokenized")
        seqs.append(Tokenized(ids, [IGNORE] * len(ids)))
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        batch = collate_sequences(chunk, False, max(len(s) for s in chunk), info["pad_token_id"])
        out.append(class_logits(model, {k: v.to(device) for k, v in batch.items()}, ctx))
    return torch.cat(out)

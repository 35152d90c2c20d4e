"""What a classification run saves, and loading it back.

`adapter/` (or `model/` for a full fine-tune): the method's own files (PEFT's format where PEFT has the method), the
label head as classify_head.safetensors and classifier.json (labels, pad id, max_length), written into one temp folder
and renamed into place together, as the reward model's are: the run is reproducible from it.

Loading it back: objectives/classify.py (load_classifier, text_logits).

`classifier/` (methods that merge, and full fine-tunes): a plain transformers sequence-classification folder, the
adapter merged into the base and the head as its `score` layer, id2label/label2id and pad_token_id in its config, so
`AutoModelForSequenceClassification.from_pretrained` and `pipeline("text-classification")` load it with the logits
the run computes. It is built from the saved artifact, not the live model: what loads is what was saved.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from tunesmith.atomic import atomic_folder
from tunesmith.errors import ModelError
from tunesmith.objectives import heads

HEAD_FILE = "classify_head.safetensors"
INFO_FILE = "classifier.json"
MERGED = "classifier"


def merges(method_settings) -> bool:
    """Whether the method's result can become one plain model (merged adapters; a full fine-tune already is one)."""
    declared = method_settings.declaration
    return not declared.not_mergeable or declared.artifact == "model"


def merged_folder_note(method_settings) -> str:
    if merges(method_settings):
        return f"saved as {MERGED}/ too: a transformers sequence classifier with the method merged in"
    return (f"no merged {MERGED}/ folder: method {method_settings.name} cannot be merged "
            f"({method_settings.declaration.not_mergeable}); the adapter and the head are saved, load them with "
            "tunesmith")


def save_classifier(model: nn.Module, head_attr: str, method, cfg, folder, labels: list[str], pad_id: int | None
                    ) -> None:
    """The artifact folder (method files, head, classifier.json), then classifier/ where the method merges."""
    folder = Path(folder)
    info = {"objective": "classify", "labels": labels, "pooling": "last_token", "pad_token_id": pad_id,
            "max_length": cfg.data.max_length, "base_model": cfg.model.path, "method": cfg.method.name}
    with atomic_folder(folder) as tmp:
        with heads.set_aside(model, head_attr) as head:
            method.save(model, cfg.method, tmp, cfg.model.path)
        heads.write_head(tmp / HEAD_FILE, head, {"labels": json.dumps(labels)})
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    if merges(cfg.method):
        write_merged(folder, folder.parent / MERGED, cfg.model.path, cfg.model.trust_remote_code)


def read_info(folder: Path) -> dict:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: no {INFO_FILE} here, so it is not a classifier; point at the adapter/ (or "
                         "model/) folder of an `objective: classify` run")
    return json.loads(path.read_text(encoding="utf-8"))


def sequence_classifier(causal: nn.Module, head: torch.Tensor, labels: list[str], pad_id: int | None) -> nn.Module:
    """transformers' sequence-classification model of `causal`'s family: its decoder, `head` as the score layer."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.architectures = None
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.pad_token_id = pad_id  # transformers reads the rightmost token that is not this one
    config.problem_type = "single_label_classification"
    config.use_cache = True
    try:
        classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise ModelError(f"{type(config).__name__}: transformers has no sequence-classification model for this "
                         f"family, so no {MERGED}/ folder can be written; the adapter and the head are saved") from None
    classifier.base_model.load_state_dict(causal.base_model.state_dict())
    score = getattr(classifier, "score", None)
    if not isinstance(score, nn.Linear) or score.weight.shape != head.shape or score.bias is not None:
        raise ModelError(f"{type(classifier).__name__}: its classification layer is not a bias-free linear `score` "
                         f"of shape {tuple(head.shape)}, so the label head cannot be put there")
    with torch.no_grad():
        score.weight.copy_(head)
    return classifier.eval()


def write_merged(artifact: Path, dest: Path, base: str, trust_remote_code: bool = False) -> Path:
    """The saved artifact (adapter merged into its base, or a model folder) as a sequence-classification folder."""
    from safetensors import safe_open

    from tunesmith.infer.adapters import is_adapter_folder, load_merged
    from tunesmith.models import load_model, load_tokenizer

    info = read_info(artifact)
    if is_adapter_folder(artifact):
        causal, tokenizer = load_merged(str(artifact), base)
    else:
        causal = load_model(str(artifact), "float32", trust_remote_code)
        tokenizer = load_tokenizer(str(artifact), trust_remote_code)
    with safe_open(str(artifact / HEAD_FILE), "pt") as fh:
        head = fh.get_tensor("weight")
    classifier = sequence_classifier(causal, head, info["labels"], info["pad_token_id"])
    if tokenizer.pad_token_id is None and info["pad_token_id"] is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(info["pad_token_id"])
    tokenizer.model_max_length = info["max_length"]  # pipeline(..., truncation=True) cuts texts where training did
    with atomic_folder(dest) as tmp:
        classifier.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return dest

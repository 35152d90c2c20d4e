"""The int4 model folder: config.json and tokenizer files as in any HF folder, the weights in
int4_model.safetensors (`<layer>.qweight` packed codes, `.scales`, `.zeros`; every other tensor as is), and the
marker tunesmith_quant.json that `models.load_model` recognises.

The weights file is deliberately not named model.safetensors: bare transformers refuses the folder instead of
silently filling the int4 layers with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.errors import ModelError
from tunesmith.quant.linear import Int4Linear

MARKER = "tunesmith_quant.json"
WEIGHTS = "int4_model.safetensors"
FORMAT = "tunesmith-int4"
VERSION = 1


def read_marker(folder) -> dict | None:
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise ModelError(f"{path}: format {marker.get('format')!r} version {marker.get('version')!r}; this tunesmith "
                         f"reads {FORMAT!r} version {VERSION}")
    if marker.get("bits") != 4:
        raise ModelError(f"{path}: bits={marker.get('bits')!r}; only 4-bit folders are supported")
    return marker


def save_quantized(model, tokenizer, dest, info: dict) -> None:
    """Write the folder atomically. `info`: method, group_size, source, and anything worth recording."""
    from safetensors.torch import save_file

    from tunesmith.atomic import atomic_folder

    layers = sorted(n for n, m in model.named_modules() if isinstance(m, Int4Linear))
    groups = {m.group_size for m in model.modules() if isinstance(m, Int4Linear)}
    marker = {"format": FORMAT, "version": VERSION, "bits": 4, **info, "group_size": groups.pop(), "layers": layers}
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        state = {k: v for k, v in state.items() if not (head is not None and k.endswith("lm_head.weight"))}
    with atomic_folder(dest) as tmp:
        model.config.use_cache = True
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _check_fits(folder, expected: dict[str, torch.Size], found: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [(k, found[k], tuple(expected[k])) for k in expected if k in found and tuple(expected[k]) != found[k]]
    if missing or unexpected or wrong:
        lines = [f"{folder}: {WEIGHTS} does not fit config.json and {MARKER} (was one of them edited, or copied "
                 "from another model? Re-run `tunesmith quantize` to rebuild the folder)"]
        lines += [f"  - {k}: the file has {a}, the config expects {b}" for k, a, b in wrong[:5]]
        lines += [f"  - missing in the file: {k}" for k in missing[:3]]
        lines += [f"  - not in the model: {k}" for k in unexpected[:3]]
        raise ModelError("\n".join(lines))


def load_quantized(folder, dtype: torch.dtype = torch.float32):
    """Build the architecture from config.json with the marker's layers as Int4Linear, then fill in the tensors."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        raise ModelError(f"{folder}: no {MARKER}; not an int4 model folder")
    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise ModelError(f"{folder}/config.json: cannot build the model: {str(e).splitlines()[0]}") from None
    for name in marker["layers"]:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, torch.nn.Linear):
            raise ModelError(f"{folder}/{MARKER}: layer {name!r} is not a linear layer of the {type(model).__name__} "
                             "that config.json describes")
        new = Int4Linear(old.in_features, old.out_features, marker["group_size"], old.bias is not None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected = {k: v for k, v in expected.items() if not k.endswith("lm_head.weight")}
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        _check_fits(folder, expected, found)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in tensors.items():
        if v.is_floating_point() and not k.endswith(".scales"):
            tensors[k] = v.to(dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.config.use_cache = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def is_quantized_folder(folder) -> bool:
    return (Path(folder) / MARKER).is_file()


def refuse_merge_into_int4(adapter, folder) -> None:
    """A plain merge whose base is an int4 folder is refused, naming the merge that is possible."""
    marker = read_marker(folder)
    if marker is None:
        return
    source = marker.get("source") or "ORIGINAL_MODEL"
    raise ModelError(
        f"{adapter}: its base {folder} holds int4 {marker.get('method', '').upper()} weights, and a LoRA adapter "
        "cannot be merged back into them exactly: re-quantising W + ΔW rounds most of ΔW away (and GPTQ would need "
        "its calibration data again). Merging into the original full-precision weights is possible, with no rounding: "
        f"tunesmith merge {adapter} OUT --model {source}")

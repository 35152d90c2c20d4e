"""QLoRA (Dettmers et al., 2023): LoRA adapters in fp32 beside base linear weights frozen in 4 bits (quant/nf4.py).

What a run saves is a plain PEFT LoRA adapter whose base_model_name_or_path is the full-precision base: it loads
on that base (here, in peft, in anything that reads LoRA) and `tunesmith merge` merges it there, into the original
weights. Merging into the 4-bit weights instead is lossy (re-quantising W + ΔW rounds most of the small ΔW away:
peft #2321, unsloth #1519), so `tunesmith merge --into nf4` refuses unless forced and then reports the measured error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunesmith.config.methods import WEIGHT_INITS, QloraSettings
from tunesmith.errors import ConfigError, OutputDirError
from tunesmith.methods import lora
from tunesmith.methods.base import conv1d_class, is_conv1d, read_adapter, replace_module
from tunesmith.methods.lora import DEFAULT, disabled, set_active, unmerge, virtual_tokens  # noqa: F401  (the interface)
from tunesmith.quant import nf4

NF4_MERGE_REFUSAL = (
    "merging into 4-bit weights is lossy: W + ΔW is re-quantised to 4 bits, and ΔW is mostly smaller than the "
    "4-bit step, so much of what the adapter learned is rounded away (peft #2321, unsloth #1519). A QLoRA adapter "
    "is a plain LoRA adapter on the full-precision base: `tunesmith merge ADAPTER OUT` merges it into the original "
    "weights, with no rounding. Pass --force to merge into the 4-bit weights anyway; the measured error is printed.")
MERGE_ERROR = "merge_error.json"
ERROR_SAMPLE = ("The quick brown fox jumps over the lazy dog. In Python, a list comprehension builds a list from "
                "an iterable: [x * x for x in range(10)]. Hacker jargon calls an ugly but working fix a kluge.")


def claims(config: dict) -> bool:
    return False  # a QLoRA run saves a plain LoRA adapter, which methods.lora claims and loads on the fp base


def apply(model: nn.Module, settings: QloraSettings, adapter_name: str = DEFAULT) -> dict[str, lora.LoraLinear]:
    """Store the base's linear weights in 4 bits (once), freeze them, add fp32 LoRA adapters to the targets."""
    from tunesmith.quant.linear import Int4Linear

    if any(isinstance(m, Int4Linear) for m in model.modules()):
        raise ConfigError("method.name: qlora stores the base in 4 bits itself, but this model is already an int4 "
                          "folder from `tunesmith quantize`; use method lora on it")
    conv1d_as_linear(model)
    reads_weights = settings.init in WEIGHT_INITS
    if reads_weights:  # A, B and the residual from the full-precision W; the residual is then stored in 4 bits
        lora.apply(model, settings, adapter_name, quantise=lambda w: round_trip(w, settings))
    if not any(nf4.is_4bit(m) for m in model.modules()) or nf4.quantizable_layers(model, missing_ok=True):
        nf4.quantize_model(model, settings.quant_type, settings.double_quant, settings.compute_dtype,
                           keep=lambda name: ".lora_A." in name or ".lora_B." in name)  # the adapters train
    return lora.lora_layers(model) if reads_weights else lora.apply(model, settings, adapter_name)


def round_trip(weight: torch.Tensor, settings: QloraSettings) -> torch.Tensor:
    """deq(quant(weight)) as the 4-bit layer stores it (LoftQ's quantise step)."""
    return nf4.dequantize_tensor(*nf4.quantize_tensor(weight, settings.quant_type, settings.double_quant)).float()


def quantize_on_load(settings: QloraSettings):
    """What models.load_model takes as `place`: the base linears stored in 4 bits as they load (what `apply` would
    quantise after loading, the same codes), so the full-precision model is never held whole; None where the
    initialisation reads the full-precision weights (method.init pissa, olora, loftq)."""
    if settings.init in WEIGHT_INITS:
        return None
    return nf4.quantizing_place(settings.quant_type, settings.double_quant, settings.compute_dtype)


# The model attribute naming the layers that were Conv1D (GPT-2) before 4-bit storage, which takes nn.Linear only:
# an adapter on them is saved with fan_in_fan_out (it is for the Conv1D base), and unloading puts Conv1D back.
WERE_CONV1D = "tunesmith_were_conv1d"


def conv1d_as_linear(model: nn.Module) -> None:
    """Replace each Conv1D by the nn.Linear computing the same (its weight transposed), named in WERE_CONV1D."""
    names = [n for n, m in model.named_modules() if is_conv1d(m)]
    for name in names:
        conv = model.get_submodule(name)
        fan_in, fan_out = conv.weight.shape
        linear = nn.Linear(fan_in, fan_out, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
        replace_module(model, name, linear)
    if names:
        setattr(model, WERE_CONV1D, names)


def linear_as_conv1d(model: nn.Module) -> None:
    """Undo conv1d_as_linear on the (dequantised, unwrapped) layers, so the model saves in its own layout."""
    for name in getattr(model, WERE_CONV1D, []):
        linear = model.get_submodule(name)
        conv = conv1d_class()(linear.out_features, linear.in_features)
        conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        replace_module(model, name, conv)
    if hasattr(model, WERE_CONV1D):
        delattr(model, WERE_CONV1D)


def save(model: nn.Module, settings: QloraSettings, folder, base_model: str, adapter_name: str = DEFAULT) -> None:
    """A plain LoRA adapter for the full-precision base (fan_in_fan_out where that base's targets are Conv1D)."""
    lora.save(model, settings, folder, base_model, adapter_name, fan_in_fan_out=bool(getattr(model, WERE_CONV1D, [])))


def unload(model: nn.Module) -> nn.Module:
    lora.unload(model)
    linear_as_conv1d(model)
    return model


def load(model: nn.Module, folder, adapter_name: str = DEFAULT, settings: QloraSettings | None = None) -> QloraSettings:
    """Quantise `model` (if not yet) and load a LoRA adapter onto it."""
    config, tensors = read_adapter(folder)
    plain = lora.settings_from_peft(config, folder)
    settings = QloraSettings(**{**(settings or QloraSettings()).model_dump(), **plain.model_dump(), "name": "qlora"})
    apply(model, settings, adapter_name)
    lora.copy_saved(model, folder, tensors, adapter_name)
    return settings


def merge(model: nn.Module) -> None:
    """Merge in memory into the dequantised 4-bit weights: the result is exactly the trained model, in fp32."""
    nf4.dequantize_model(model)
    lora.merge(model)


@torch.no_grad()
def merge_requantized(model: nn.Module, settings: QloraSettings) -> None:
    """Fold each adapter into its 4-bit weight and re-quantise: W4 ← Q(deq(W4) + ΔW). Leaves 4-bit layers."""
    for name, layer in list(lora.lora_layers(model).items()):
        if not nf4.is_4bit(layer.base_layer):
            continue
        base = nf4.to_linear(layer.base_layer)
        base.weight.data += layer.delta_weight(layer.active)
        replace_module(model, name, nf4.to_4bit(base, settings.quant_type, settings.double_quant,
                                                settings.compute_dtype))


def settings_of_run(adapter: str | Path) -> QloraSettings:
    """The 4-bit settings the adapter was trained with (from its run's config.yaml), else the defaults: where no
    config.yaml sits beside the adapter, or it is not a run config, or the run trained another method. A qlora run
    config that cannot be read or whose method section does not validate is an error, not a silent default."""
    import yaml
    from pydantic import ValidationError

    from tunesmith.config.reference import reference
    from tunesmith.config.run import RunConfig

    path = Path(adapter).parent / "config.yaml"
    if not path.is_file():
        return QloraSettings()
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: could not read the adapter's run config to find its 4-bit settings "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    method = tree.get("method") if isinstance(tree, dict) else None
    if not isinstance(method, dict) or method.get("name") != "qlora":
        return QloraSettings()
    try:
        return QloraSettings(**method)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        cited = reference(RunConfig, "", ("method", "qlora", *err["loc"]))
        raise ConfigError(f"{path}: method.{field}: {err['msg']} (the adapter's run config, read for its 4-bit "
                          f"settings; fix or remove that file); see {cited}") from None


def merge_into_4bit_folder(adapter: str, out: str, model_path: str | None = None, overwrite: bool = False,
                           device: str = "auto") -> Path:
    """The forced, lossy merge: base → 4 bits + adapter (reference) → fold and re-quantise → measure the logit
    error on a fixed sample → save the dequantised result as a plain HF folder, atomically. Computed on `device`,
    saved from the CPU."""
    from tunesmith.atomic import atomic_folder
    from tunesmith.devices import require_device
    from tunesmith.methods.base import adapter_base
    from tunesmith.models import load_model, load_tokenizer

    place = require_device(device)
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise OutputDirError(f"{dest} already exists and is not empty; pass --overwrite to replace it")
    settings = settings_of_run(adapter)
    base = adapter_base({"default": adapter}, model_path)
    model, tokenizer = load_model(base).to(place), load_tokenizer(base)
    load(model, adapter, settings=settings)
    model.eval()
    ids = tokenizer(ERROR_SAMPLE, return_tensors="pt")["input_ids"].to(place)
    with torch.no_grad():
        reference = model(ids).logits.float()
        merge_requantized(model, settings)
        lora.unload(model)
        diff = (model(ids).logits.float() - reference).abs()
    nf4.dequantize_model(model)
    model.to("cpu")
    linear_as_conv1d(model)
    error = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
             "tokens": ids.shape[1], "quant_type": settings.quant_type, "double_quant": settings.double_quant}
    with atomic_folder(dest) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_ERROR).write_text(json.dumps(error, indent=1) + "\n")
    return dest


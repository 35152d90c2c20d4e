"""Base model + adapters for inference (several named LoRA adapters can share one base), and merging."""

from __future__ import annotations

from pathlib import Path

from tunesmith.atomic import atomic_folder
from tunesmith.context import RunContext
from tunesmith.errors import ConfigError, ModelError, OutputDirError
from tunesmith.methods import declaration, method_for_adapter, trainable_tokens
from tunesmith.methods.base import ADAPTER_CONFIG, adapter_base
from tunesmith.methods.new_tokens import fit_embeddings

TOKENIZER_CONFIG = "tokenizer_config.json"


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def parse_adapter_args(values: list[str] | str | None) -> dict[str, str]:
    """`--adapter PATH` or `--adapter NAME=PATH` (repeatable) → {name: path}."""
    if not values:
        return {}
    values = [values] if isinstance(values, str) else values
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = ("default" if len(values) == 1 else Path(v).name), v
        if name in out:
            raise ConfigError(f"--adapter: the name {name!r} is used twice")
        out[name] = path
    return out


def adapter_context(adapter) -> RunContext:
    """The run context inference passes along with a model that `load_with_adapter(…, adapter)` loaded: the hook of
    the adapter's method for its virtual tokens (prompt, prefix), if it has one (such adapters are loaded alone)."""
    hooks = [method_for_adapter(path)[1].virtual_tokens for path in parse_adapter_args(adapter).values()]
    return RunContext(virtual_tokens=next((hook for hook in hooks if hook is not None), None))


def load_adapters(model, adapters: dict[str, str]) -> dict[str, str]:
    """Load each named adapter; returns {name: method}. Several adapters can share one model when all are LoRA
    or all are DoRA (methods that declare named adapters)."""
    methods = {}
    for name, path in adapters.items():
        method_name, module = method_for_adapter(path)
        methods[name] = method_name
        named = declaration(method_name).named_adapters
        if len(adapters) > 1 and not named:
            raise ConfigError(f"--adapter {name}={path}: a {method_name} adapter cannot share the model with "
                              "others; several adapters at once work for LoRA (or DoRA) adapters")
        if len(set(methods.values())) > 1:
            raise ConfigError(f"--adapter {name}={path}: a {method_name} adapter cannot share the model with "
                              f"{', '.join(sorted(set(methods.values()) - {method_name}))} adapters; load "
                              "adapters of one method together")
        if named:
            module.load(model, path, name)
        else:
            module.load(model, path)
        if trainable_tokens.load(model, path) and len(adapters) > 1:
            raise ConfigError(f"--adapter {name}={path}: it carries trained token rows, so it is loaded alone")
    return methods


def adapter_tokenizer_folder(adapters: dict[str, str]) -> str | None:
    """The first adapter folder that holds a tokenizer (saved with new tokens), if any."""
    return next((path for path in adapters.values() if (Path(path) / TOKENIZER_CONFIG).is_file()), None)


def load_with_adapter(model_path: str | None, adapter, dtype: str = "float32", trust_remote_code: bool = False,
                      use: str | None = None, device: str = "auto"):
    """Load the base and the adapters (`adapter`: a path, a list of NAME=PATH, or None); activate `use`. The model
    goes to `device` (`--device`: auto = CUDA, else MPS, else the CPU) before the adapters load, so that they are
    built beside the layers they wrap; every inference command loads through here."""
    from tunesmith.devices import require_device
    from tunesmith.methods import lora
    from tunesmith.models import load_model, load_tokenizer

    place = require_device(device)
    adapters = parse_adapter_args(adapter)
    base = adapter_base(adapters, model_path)
    model = load_model(base, dtype, trust_remote_code).to(place)
    grown = adapter_tokenizer_folder(adapters)  # saved with new tokens: the base is resized to it
    tokenizer = load_tokenizer(grown or base, trust_remote_code)
    if grown:
        fit_embeddings(model, tokenizer)
    load_adapters(model, adapters)
    if len(adapters) > 1 or use:
        if use is not None and use != "none" and use not in adapters:
            raise ConfigError(f"--use {use}: no adapter of that name; loaded: {', '.join(adapters)}")
        lora.set_active(model, None if use in (None, "none") else use)
    model.eval()
    return model, tokenizer


def refuse_unmergeable(adapter: str) -> tuple[str, object]:
    """(method name, module) of a mergeable adapter; a ModelError naming the reason otherwise."""
    method_name, module = method_for_adapter(adapter)
    why_not = declaration(method_name).not_mergeable
    if why_not:
        raise ModelError(f"{adapter}: method {method_name!r} cannot be merged: {why_not}")
    return method_name, module


def load_merged(adapter: str, model_path: str | None = None, device: str = "auto"):
    """(model, tokenizer): the full-precision base with the adapter folded into its weights, adapter layers gone;
    merged on `device`, where the model stays."""
    _, module = refuse_unmergeable(adapter)
    model, tokenizer = load_with_adapter(model_path, adapter, device=device)
    module.merge(model)
    module.unload(model)
    trainable_tokens.merge_and_unload(model)
    return model, tokenizer


def merge_to_folder(adapter: str, out: str, model_path: str | None = None, overwrite: bool = False,
                    into: str = "full", force: bool = False, device: str = "auto") -> Path:
    """Merge into the full-precision base on `device` and save with save_pretrained (safetensors, from the CPU),
    atomically.
    into="nf4": into the base's 4-bit weights instead (lossy; refused unless forced; the measured logit error
    is written beside the model as merge_error.json)."""
    dest = Path(out)
    method_name, _ = refuse_unmergeable(adapter)
    from tunesmith.models import resolve_model_path
    from tunesmith.quant.folder import refuse_merge_into_int4

    refuse_merge_into_int4(adapter, resolve_model_path(adapter_base({"default": adapter}, model_path)))
    if into == "nf4":
        from tunesmith.methods import qlora

        if method_name != "lora":
            raise ModelError(f"{adapter}: --into nf4 merges LoRA adapters; this one is {method_name}")
        if not force:
            raise ModelError(f"{adapter}: --into nf4 refused: {qlora.NF4_MERGE_REFUSAL}")
        return qlora.merge_into_4bit_folder(adapter, out, model_path, overwrite, device)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise OutputDirError(f"{dest} already exists and is not empty; pass --overwrite to replace it")
    model, tokenizer = load_merged(adapter, model_path, device)
    model.to("cpu")
    with atomic_folder(dest) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return dest

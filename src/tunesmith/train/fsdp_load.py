"""FSDP sharded from the start: no rank ever holds the whole model.

Under `distributed.strategy: fsdp` open_run builds the model's skeleton (`skeleton`): the architecture from its
config.json, every weight a zero-strided view of a single zero (no memory), the buffers (rotary frequencies) computed
as construction computes them. The method is applied to the skeleton as to a loaded model: its new parameters are
real, drawn from the same RNG stream in the same order (no step before draws from it: loading does not), so a seed
gives the adapters the values one process gives them. `shard_and_read` then shards the model (fully_shard per
decoder layer and on the root, train/distributed.py): each rank keeps its rows of every parameter, the method's
values sliced, the zero views allocated at the shard's size; and each rank reads its own rows of each weight
straight from the safetensors files (safe_open's get_slice on dim 0, the dimension FSDP2 shards: rank r gets rows
[r·⌈n/W⌉, (r+1)·⌈n/W⌉) ∩ [0, n), as torch.chunk cuts them; FSDP2 pads the shorter last chunks itself). A weight
tied to another (tied embeddings) is one parameter, read under whichever of its names the files hold.

`whole_load_reason` names what still loads the whole model on every rank and shards it at wrap (the way every
FSDP run loaded before): a method whose initial values are computed from the base weights (DoRA's norms, virtual
tokens from the vocabulary), an objective that prepares on the weights before training (the cached reference of a
base that trains, a new head), a quantized folder, or weights the files do not hold under the model's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import ModelError

SOURCES = "_sharded_load_sources"  # the skeleton's attribute: {id(parameter): its names in the files}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_files(folder: Path) -> dict[str, Path]:
    """Each tensor name of the folder's safetensors weights → the file that holds it."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE), framework="pt") as f:
            return {name: folder / SINGLE for name in f.keys()}
    return {}


def whole_load_reason(cfg, folder: str) -> str | None:
    """Why this fsdp run loads the whole model on every rank before sharding it, or None: it loads shards only."""
    from tunesmith.quant.folder import is_quantized_folder

    method, objective = cfg.method.declaration, cfg.objective_declaration
    if cfg.method.init_reads_weights():
        return f"method {cfg.method.name} computes its initial values from the base weights"
    if objective.own_head:
        return f"objective {cfg.objective} adds its head to the loaded model before training"
    if objective.reference and method.trains_base:
        return (f"objective {cfg.objective} keeps the reference of a base that trains ({cfg.method.name}), taken "
                "from the loaded weights before training")
    if is_quantized_folder(folder):
        return "the folder holds quantized weights"
    if not weight_files(Path(folder)):
        return f"{folder} holds no model.safetensors (or its index)"
    return None


def skeleton(folder: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `folder` built without its weights: each parameter a zero-strided CPU view of one zero in
    `dtype`, the buffers real; in eval mode with use_cache off, as load_model returns a model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.tie_weights()  # from_config ties nothing under init_empty_weights
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"model.path: could not build a causal LM from {folder}: {msg}") from None
    stored = set(weight_files(Path(folder)))
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)

    def zero_view(param: nn.Parameter) -> nn.Parameter:
        keys = [n for n in names[id(param)] if n in stored]
        if not keys:
            raise ModelError(f"model.path: {folder} holds no tensor {names[id(param)][0]} for the "
                             f"{type(model).__name__} its config.json describes")
        view = nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape), requires_grad=param.requires_grad)
        names[id(view)] = keys
        return view

    views = _swap_parameters(model, zero_view)
    setattr(model, SOURCES, {id(p): names[id(p)] for p in views})
    model.config.use_cache = False
    return model.eval()


def shard_and_read(model: nn.Module, ranks, folder: str, device: torch.device) -> None:
    """Shard the skeleton (the method applied) over the ranks and fill each rank's rows of the base weights from
    the files; the method's parameters keep the values it gave them."""
    from safetensors import safe_open

    sources: dict[int, list[str]] = getattr(model, SOURCES)
    read_from = {name: sources[id(p)] for name, p in model.named_parameters() if id(p) in sources}
    _base_to_meta(model, device, sources)
    ranks.shard_model(model)  # FSDP2 leaves a meta parameter's shard on meta and moves the others' shards to device
    _allocate(model, device)
    files = weight_files(Path(folder))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in read_from:
                key = read_from[name][0]
                # opened per tensor: the pages read through the file's mapping leave with it, so they never add up
                with safe_open(str(files[key]), framework="pt") as handle:
                    _read_rows(handle, key, param, ranks)
    delattr(model, SOURCES)


def _base_to_meta(model: nn.Module, device: torch.device, sources: dict[int, list[str]]) -> None:
    """The zero views become meta parameters (FSDP2 shards only contiguous tensors, and leaves meta ones for
    later); the method's parameters and the buffers move to `device`."""
    _swap_parameters(model, lambda param: nn.Parameter(
        torch.empty(param.shape, dtype=param.dtype, device="meta") if id(param) in sources
        else param.detach().to(device), requires_grad=param.requires_grad))
    for module in model.modules():
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = buffer.to(device)


def _swap_parameters(model: nn.Module, make) -> list[nn.Parameter]:
    """Replace each parameter by make(parameter) (None: keep it), once per parameter however many modules hold it, so
    tied weights stay tied (module.to_empty would untie them); returns the new parameters."""
    made: dict[int, tuple[nn.Parameter, nn.Parameter | None]] = {}  # the old one kept alive: its id stays its own
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                made[id(param)] = (param, make(param))
            if made[id(param)][1] is not None:
                module._parameters[key] = made[id(param)][1]
    return [new for _, new in made.values() if new is not None]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _allocate(model: nn.Module, device: torch.device) -> None:
    """Memory on `device` for every meta shard (uninitialised: the files fill it), one per parameter however many
    modules hold it (module.to_empty would untie tied weights)."""
    _swap_parameters(model, lambda param: nn.Parameter(torch.empty_like(param, device=device),
                                                        requires_grad=param.requires_grad) if param.is_meta else None)


def _read_rows(handle, key: str, param: torch.Tensor, ranks) -> None:
    """Copy this rank's rows of tensor `key` (FSDP2's dim-0 chunk) into `param`'s local shard."""
    local = _local(param)
    rows = param.shape[0] if param.dim() else 0
    per_rank = -(-rows // ranks.world) if rows else 0
    start = min(ranks.rank * per_rank, rows)
    stored = handle.get_slice(key)
    if list(stored.get_shape()) != list(param.shape):
        raise ModelError(f"{key}: the file holds shape {stored.get_shape()}, the model expects {list(param.shape)}")
    part = stored[start:start + local.shape[0]] if param.dim() else stored[:]
    local.copy_(part.to(local.dtype))


def load_for(cfg, ranks, console, place=None) -> tuple[nn.Module, str | None]:
    """(the model open_run applies the method to, the folder to read its shards from after that or None): under
    fsdp the skeleton where it can be read shard by shard, else the whole model (load_model, `place` taking
    tensors over as they load: weights.py)."""
    from tunesmith.models import load_model, refuse_untrusted_code, resolve_model_path

    m = cfg.model
    if ranks.strategy == "fsdp":
        folder = resolve_model_path(m.path, m.trust_remote_code, m.allow_download)
        why = whole_load_reason(cfg, folder)
        if why is None:
            refuse_untrusted_code(folder, m.trust_remote_code)
            console.print(f"[bold]fsdp[/bold] each rank reads only its shards of {folder}")
            return skeleton(folder, getattr(torch, m.dtype), m.trust_remote_code), folder
        console.print(f"[bold]fsdp[/bold] every rank loads the whole model and shards it after: {why}")
    return load_model(m.path, m.dtype, m.trust_remote_code, m.allow_download, place, cfg.frozen_linears_bf16), None

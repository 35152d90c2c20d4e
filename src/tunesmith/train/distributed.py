"""Runs launched by torchrun: one process per rank, data sharded per rank, gradients combined by DDP or FSDP2.

torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) decides whether a run is distributed; the
`distributed:` section of the config says how. The loop asks a `Ranks` object (one process: `OneProcess`) for what
differs between the two, so it never branches on the rank:

- which examples of a global micro-batch this rank computes (`shard`): every rank draws the same seeded stream of
  indices, `batch_size × world` per micro-batch, and keeps its slice, so the data position is global and a run resumes
  exactly on any number of ranks;
- sums over the ranks (`sum`): the loss is normalised by the global count of units (label tokens, pairs), so
  W ranks × batch b compute the gradient of one process × batch W·b;
- the forward pass of the loss (`loss_sum`): through the DDP or FSDP2 wrapper of a small module whose forward is the
  objective's loss, since objectives call the decoder and the head themselves, not model.forward;
- gradient synchronisation only on the last micro-batch of a step (`gradient_sync`), clipping (`clip`);
- full (consolidated) state for checkpoints and the saved artifact, gathered on rank 0, which alone writes.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from tunesmith.config.distributed import refusal
from tunesmith.errors import ConfigError, TunesmithError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ROOT_PREFIX = "model."  # the model's parameter names inside the wrapper module


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


class LossModule(nn.Module):
    """The module DDP and FSDP2 wrap: its forward is an objective's loss on the model (their hooks run on forward);
    the run's objective, or under FSDP the forgetting probe's LM loss on the same shards."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute, *args):
        return compute(self.model, *args)


class OneProcess:
    """A run on one process: every helper is the identity."""

    world, rank, main, strategy = 1, 0, True, None

    def device(self, device: torch.device) -> torch.device:
        return device

    def barrier(self) -> None:
        pass

    def shard(self, indices: list[int]) -> list[int]:
        return indices

    def sum(self, values: list[float]) -> list[float]:
        return values

    def wrap(self, model: nn.Module, objective) -> None:
        pass

    def loss_sum(self, model, objective, batch, ctx):
        return objective.loss_sum(model, batch, ctx)

    def call(self, model, compute, *args):
        """compute(model, *args), under FSDP on every rank together through the sharded model (a forward pass
        before training, such as the speed patches' check)."""
        return compute(model, *args)

    def gradient_sync(self, last: bool):
        return nullcontext()

    def clip(self, params: list, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def optimizer_state(self, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def consolidate(self, model: nn.Module) -> None:
        """Leave `model` on the main rank holding its full parameters, as one process would (for saving)."""


class DataParallel(OneProcess):
    """DDP: the whole model on every rank, gradients all-reduced (averaged) in buckets during the backward pass."""

    strategy = "ddp"
    wrapped = model = None

    def __init__(self, settings, device: torch.device):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=settings.timeout_s))
        self.settings = settings
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.main = self.rank == 0
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.wrapped = None
        self.model = None

    def device(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def shard(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.world
        return indices[self.rank * per_rank : (self.rank + 1) * per_rank]

    def sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def wrap(self, model: nn.Module, objective) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.model = model
        device = next(model.parameters()).device
        # buffers are never trained: no broadcast of them before every forward (torch renamed the switch in 2.12)
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        self.wrapped = DistributedDataParallel(LossModule(model),
                                               device_ids=[device.index] if device.type == "cuda" else None,
                                               **no_buffer_sync)

    def loss_sum(self, model, objective, batch, ctx):
        if model is not self.model or not torch.is_grad_enabled():
            return objective.loss_sum(model, batch, ctx)  # evaluation: every rank computes it alone, no collective
        return self.wrapped(objective.loss_sum, batch, ctx)

    def gradient_sync(self, last: bool):
        return nullcontext() if last else self.wrapped.no_sync()


class FullySharded(DataParallel):
    """FSDP2: fully_shard on each decoder layer and on the root; full state dicts gathered for checkpoints."""

    strategy = "fsdp"
    bf16 = False

    def __init__(self, settings, device: torch.device, bf16: bool = False):
        super().__init__(settings, device)
        self.bf16 = bf16

    def wrap(self, model: nn.Module, objective) -> None:
        if self.wrapped is None:  # a model loaded shard by shard (train/fsdp_load.py) is sharded already
            self.shard_model(model)

    def shard_model(self, model: nn.Module) -> None:
        """fully_shard each decoder layer and the root: each rank keeps its dim-0 chunk of every parameter."""
        from torch.distributed.fsdp import fully_shard

        quantized = sorted({type(m).__name__ for m in model.modules()
                            if type(m).__module__.startswith(("tunesmith.quant", "bitsandbytes"))})
        if quantized:
            raise ConfigError(
                "distributed.strategy: fsdp cannot shard this model's quantized layers (" + ", ".join(quantized) +
                "): their int4 weights are packed buffers, which FSDP does not shard, and their products need the "
                "whole weight. Use distributed.strategy: ddp")
        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError(f"distributed.strategy: fsdp shards per decoder layer, but {type(model).__name__} "
                              "has no list of decoder layers; use distributed.strategy: ddp")
        policy = self._precision(model)
        for layer in layers:
            fully_shard(layer, reshard_after_forward=self.settings.reshard_after_forward, **policy)
        self.model = model
        self.wrapped = fully_shard(LossModule(model), **policy)

    def _precision(self, model: nn.Module) -> dict:
        """Under train.bf16 with bf16 weights: gather the parameters in bf16 (the adapters' fp32 ones cast, as
        autocast casts them for every product on one process) and reduce the gradients in fp32. With fp32 weights
        nothing is cast: autocast computes in bf16 from the fp32 parameters, exactly as on one process."""
        if not (self.bf16 and any(p.dtype == torch.bfloat16 for p in model.parameters())):
            return {}
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # the loss module's inputs stay as they are (a DPO reference's fp32 log-probs are not rounded to bf16)
        return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                  cast_forward_inputs=False)}

    def loss_sum(self, model, objective, batch, ctx):
        return self.call(model, objective.loss_sum, batch, ctx)  # evaluation too: every rank takes part

    def call(self, model, compute, *args):
        if model is not self.model:
            return compute(model, *args)
        out = self.wrapped(compute, *args)
        if not torch.is_grad_enabled():
            # without a backward the root keeps its gathered parameters registered: shard them again (the
            # optimizer holds the shards, and the whole embedding should not stay on every rank)
            self.wrapped.reshard()
        return out

    def gradient_sync(self, last: bool):
        return _fsdp_sync(self.wrapped, last)

    def clip(self, params: list, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _options(self, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.wrapped, options=self._options(cpu_offload=True, ignore_frozen_params=True))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        return {n: full[ROOT_PREFIX + n].contiguous() for n in trainable} if self.main else {}

    def load_trainable(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.wrapped, {ROOT_PREFIX + n: t for n, t in tensors.items()},
                             options=self._options(strict=False))

    def _optimizer_names(self, optimizer) -> list[list[str]]:
        names = {id(p): n for n, p in self.wrapped.named_parameters()}
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]

    def optimizer_state(self, optimizer) -> dict:
        """The full optimizer state in the form one process's optimizer.state_dict() has (parameters by index)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.wrapped, optimizer, options=self._options(cpu_offload=True))
        if not self.main:
            return {}
        names = [n for group in self._optimizer_names(optimizer) for n in group]
        local = optimizer.state_dict()  # the same param_groups, parameters numbered
        return {"state": {i: full["state"][n] for i, n in enumerate(names) if n in full["state"]},
                "param_groups": local["param_groups"]}

    def load_optimizer(self, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        groups = self._optimizer_names(optimizer)
        names = [n for group in groups for n in group]
        full = {"state": {names[int(i)]: s for i, s in state["state"].items()},
                "param_groups": [{**g, "params": group} for g, group in zip(state["param_groups"], groups)]}
        set_optimizer_state_dict(self.wrapped, optimizer, full, options=self._options())

    def consolidate(self, model: nn.Module) -> None:
        """Gather the full trainable parameters on the main rank and put them into `model` there as plain parameters
        (call once, at the end). What the methods save is their trainable parameters (all of them for a full
        fine-tune), so a frozen base stays sharded: the main rank never holds it whole."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.wrapped, options=self._options(cpu_offload=True, ignore_frozen_params=True))
        if not self.main:
            return
        plain: dict[int, nn.Parameter] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                plain[id(param)] = nn.Parameter(full[ROOT_PREFIX + name].to(param.device), requires_grad=True)
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) in plain:
                    module._parameters[key] = plain[id(param)]


@contextmanager
def _fsdp_sync(wrapped, last: bool):
    wrapped.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def refuse_under_torchrun(cfg) -> None:
    """Under torchrun, refuse what does not spread over ranks before anything loads, rather than run it as one
    process per rank."""
    if not launched_by_torchrun():
        return
    strategy = cfg.distributed.strategy if cfg.distributed is not None else "ddp"
    why = refusal(cfg.objective_declaration, cfg.method, strategy)
    if why:
        raise ConfigError(f"{why} (this process is rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} started "
                          "by torchrun)")


def ranks_for(cfg, device: torch.device, console) -> OneProcess:
    """The ranks of this run: torchrun's environment decides whether it is distributed, `distributed:` how."""
    settings = cfg.distributed
    if not launched_by_torchrun():
        if settings is not None:
            console.print(f"[bold]distributed[/bold] strategy {settings.strategy} set, but this process was not "
                          "started by torchrun: training as one process (launch with `torchrun --nproc_per_node N "
                          "-m tunesmith train CONFIG` to use N ranks)")
        return OneProcess()
    if settings is None:
        raise ConfigError(
            f"distributed: this process is rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} started by "
            "torchrun, but the config has no distributed: section; add `distributed: {strategy: ddp}` (or fsdp), "
            "or run `tunesmith train` without torchrun")
    if settings.strategy == "fsdp":
        return FullySharded(settings, device, bf16=cfg.train.bf16)
    return DataParallel(settings, device)


class RankLost(TunesmithError):
    """A collective operation failed: another rank died, hung past distributed.timeout_s, or lost its connection."""


def lost_rank(error: BaseException, checkpoints: list[Path]) -> RankLost | None:
    """What to tell the user when `error` stopped a distributed run whose complete checkpoints are `checkpoints`, or
    None when it was not a distributed run's collective failure (a RuntimeError from gloo or NCCL while the process
    group is up)."""
    import torch.distributed as dist

    if not (isinstance(error, RuntimeError) and dist.is_available() and dist.is_initialized()):
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    where = (f"The last complete checkpoint is {checkpoints[-1]}; continue with --resume (on any number of ranks)"
             if checkpoints else "No checkpoint was written yet (set train.save_every to keep some)")
    return RankLost(f"rank {dist.get_rank()} of {dist.get_world_size()}: the job stopped because a collective "
                    f"operation with the other ranks failed ({first}); another rank died, hung for longer than "
                    f"distributed.timeout_s, or lost its connection, and torchrun stops them all. {where}")


def leave() -> None:
    """End this process's part in the job once every rank is done (the CLI calls it after a run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

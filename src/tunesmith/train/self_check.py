"""Before training: the model as the speed patches leave it computes what the plain model computed.

Each patch of kernels/apply.py rests on transformers' or torch's internals (the attention interface, the names of
norm classes, the config's attention implementation, a private oneDNN op), which a new version may change without
an error. So once per run, on a packed batch of three short examples (two sharing a prefix), the plain model's
logits are recorded, and after each patch they (or, for the chunked loss, the loss) are computed again on the same
weights; a patch that moves them beyond the rounding of another summation order stops the run, named with the
setting that turns it off. Segment attention whose layout the model's attention layers never pass on (their forward
drops the keyword) is switched off instead, with that reason in the log line: it is the model's structure, not a
patch computing wrongly. It costs one forward of 20 tokens, without gradients, per patch and one before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.packing import collate
from tunesmith.data.shared_prefixes import MIN_SHARED
from tunesmith.devices import autocast_for, to_device
from tunesmith.errors import ModelError
from tunesmith.kernels.apply import apply_speed_options, switched_off
from tunesmith.kernels.patches import Patch
from tunesmith.kernels.segment_attention import SegmentAttentionError
from tunesmith.objectives import lm
from tunesmith.train.distributed import OneProcess

# Largest |patched − plain| of a logit, relative to the largest |logit| (and the same for the loss). Measured on
# SmolLM2 with LoRA: 3.4e-6 in fp32, 1.4e-2 under bf16 autocast, 1.7e-2 with bf16 weights; attention across the
# examples of the row (the failure segment attention guards against) moves them by 1.2. Prefix tuning's freshly
# initialised keys make SmolLM2 ill-conditioned: at seed 42 on an Intel Xeon (AMX) the plain fp32 logits are 9.7e-5
# from a float64 forward and the oneDNN ones 3.3e-4 (4.2e-4 apart), rounding both; hence 1e-3 in fp32.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 1e-1}
LOSS_SETTING = "train.loss_chunk"


class SpeedPatchError(ModelError):
    """A speed patch changed what the model computes."""


def _probe_batch(model, cfg, pad_id: int) -> dict[str, torch.Tensor]:
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    n = min(MIN_SHARED + 2, cfg.data.max_length)

    def tokens(k: int) -> list[int]:
        return torch.randint(3, max(4, min(vocab, 1000)), (k,), generator=g).tolist()

    prefix = tokens(MIN_SHARED)
    sequences = [prefix + tokens(n - MIN_SHARED), prefix + tokens(n - MIN_SHARED), tokens(n)]
    examples = [Tokenized(ids, [IGNORE] + ids[1:]) for ids in sequences]
    return collate(examples, cfg.data.packing, cfg.data.max_length, pad_id, cfg.data.share_prefixes)


@torch.no_grad()
def _logits(model, batch, cfg, device, ctx: RunContext) -> torch.Tensor:
    with autocast_for(cfg, device):
        where = batch["targets"] != IGNORE
        return lm.logits_at(model, lm.hidden_states(model, batch, ctx)[where]).float()


@torch.no_grad()
def _loss(model, batch, cfg, device, ctx: RunContext) -> float:
    with autocast_for(cfg, device):
        loss, n, _ = lm.loss_sum(model, batch, ctx)
    return float(loss) / n


def _switch_off_last(ctx: RunContext, reason: str) -> None:
    """Undo the patch just applied and record it as one the model cannot take."""
    setting, patch = ctx.patches[-1]
    patch.unpatch()
    ctx.patches[-1] = (setting, Patch(0, reason=reason))


def checked_speed_options(model, cfg, device, pad_id: int, ctx: RunContext, ranks=None) -> str:
    """apply_speed_options(model, cfg.train, ctx), each patch checked against the plain model; returns a log line.
    Each forward goes through `ranks` (a model sharded at load computes on all ranks together)."""
    batch = to_device(_probe_batch(model, cfg, pad_id), device)

    @torch.no_grad()
    def forward(compute):
        return (ranks or OneProcess()).call(model, compute, batch, cfg, device, ctx)

    targets = batch["targets"][batch["targets"] != IGNORE]
    was_training = model.training
    model.eval()  # no dropout: the same weights give the same logits
    plain_logits = forward(_logits)
    plain_loss = float(F.cross_entropy(plain_logits, targets))  # what lm.loss_sum computes without chunks
    scale = float(plain_logits.abs().max()) or 1.0
    compute_dtype = torch.bfloat16 if cfg.train.bf16 else model.get_input_embeddings().weight.dtype
    tolerance = TOLERANCE.get(compute_dtype, 1e-1)
    checked, worst = [], 0.0

    def compare(setting: str) -> None:
        nonlocal worst
        if setting == LOSS_SETTING:
            moved = abs(forward(_loss) - plain_loss) / max(plain_loss, 1e-6)
            what = "the loss"
        else:
            try:
                moved = float((forward(_logits) - plain_logits).abs().max()) / scale
            except SegmentAttentionError:  # the model's own structure, not a miscomputing patch
                _switch_off_last(ctx, "its attention layers do not pass the packed row's segment layout on to the "
                                      "attention function")
                return
            what = "the logits"
        if not moved <= tolerance:
            off = "null" if setting == LOSS_SETTING else "false"
            raise SpeedPatchError(
                f"{setting}: this speed patch changes what {type(model).__name__} computes with the installed "
                f"transformers/torch (on a probe batch {what} moved by {moved:.2e} of their scale, more than the "
                f"{tolerance:.0e} that rounding explains); set {setting}: {off} to train without it")
        checked.append(setting)
        worst = max(worst, moved)

    try:
        apply_speed_options(model, cfg.train, ctx, after_each=compare,
                            base_is_trained=cfg.method.declaration.trains_base)
    finally:
        model.train(was_training)
    off = "".join(f"; {setting} off for {type(model).__name__}: {why}" for setting, why in switched_off(ctx))
    if not checked:
        return "no speed patch applies to this model" + off
    return (f"{', '.join(checked)} checked: the plain model's logits (largest difference {worst:.1e} of their scale)"
            + off)

"""Next-token cross-entropy on labelled positions: SFT (assistant turns) and continued pretraining (all text).

Logits are computed only where a target exists, never for the whole (sequence × vocabulary); with
`train.loss_chunk` they are computed a chunk of label positions at a time (objectives/chunked_ce.py), here and in the
per-token log-probabilities DPO and PPO score sequences with (`token_logps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE
from tunesmith.kernels import segment_attention
from tunesmith.kernels.attention_mask import attention_mask_for
from tunesmith.kernels.patches import is_plain_linear
from tunesmith.objectives.chunked_ce import Workspace, linear_cross_entropy_sum, linear_token_logps
from tunesmith.objectives.protocol import nothing_to_keep


def hidden_states(model, batch: dict[str, torch.Tensor], ctx: RunContext) -> torch.Tensor:
    """Final hidden states (B, L, H) aligned with batch["input_ids"].

    Virtual-token methods (prompt, prefix, P-tuning v2) give the run context a hook (`ctx.virtual`) returning the
    module that runs the decoder itself (adding its virtual tokens / key-value prefixes), with the same alignment.
    """
    virtual = ctx.virtual(model)
    if virtual is not None:
        return virtual.hidden_states(model, batch)
    if "segment_plan" in batch and segment_attention.active(model):
        return segment_attention.run_decoder(model, batch, ctx.compiled)
    decoder = model.get_decoder()
    dtype = next(model.parameters()).dtype
    out = decoder(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(model, batch["attention_mask"], dtype),
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out.last_hidden_state


def logits_at(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = _softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunkable_head(model, ctx: RunContext) -> torch.nn.Linear | None:
    """The LM head when `train.loss_chunk` asks for chunked cross-entropy and the head is a plain linear map
    without bias (kernels/patches.py: nn.Linear or a stand-in computing the same product, e.g. one whose frozen
    weight is stored in bf16). A final logit soft-cap is applied chunk by chunk (`_softcap`)."""
    if not ctx.loss_chunk:
        return None
    head = model.get_output_embeddings()
    return head if is_plain_linear(head) and head.bias is None else None


def _softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


def _workspace(ctx: RunContext) -> Workspace:
    return ctx.workspace("chunked_ce", lambda: Workspace(onednn=ctx.onednn))


def token_logps(model, hidden: torch.Tensor, targets: torch.Tensor, ctx: RunContext, entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) of each row of `hidden` (label positions, (N, H)) as fp32 (N,), and with `entropy` the entropy
    of each row's next-token distribution (detached)."""
    head = _chunkable_head(model, ctx)
    if head is not None:
        return linear_token_logps(hidden, head.weight, targets, ctx.loss_chunk, _workspace(ctx), entropy,
                                  _softcap(model))
    logits = logits_at(model, hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = -F.cross_entropy(logits, targets, reduction="none")
    if not entropy:
        return logps, None
    with torch.no_grad():
        logp = F.log_softmax(logits, dim=-1)
        return logps, -(logp.exp() * logp).sum(-1)


def loss_sum(model, batch: dict[str, torch.Tensor], ctx: RunContext) -> tuple[torch.Tensor, int, dict]:
    targets = batch["targets"]
    where = targets != IGNORE
    hidden = hidden_states(model, batch, ctx)[where]
    head = _chunkable_head(model, ctx)
    if head is not None:
        loss = linear_cross_entropy_sum(hidden, head.weight, targets[where], ctx.loss_chunk, _workspace(ctx),
                                        _softcap(model))
        return loss, int(where.sum()), {}
    logits = logits_at(model, hidden)
    loss = F.cross_entropy(logits.float(), targets[where], reduction="sum")
    return loss, int(where.sum()), {}


# The objective interface (objectives/protocol.py): language modelling on labelled tokens.

own_loop = None
keep_in_run = nothing_to_keep


def build_datasets(cfg, tokenizer):
    from tunesmith.data.pipeline import build_datasets as build

    return build(cfg, tokenizer)


def collate(examples, cfg, pad_id: int) -> dict[str, torch.Tensor]:
    from tunesmith.data.packing import collate as collate_examples

    return collate_examples(examples, cfg.data.packing, cfg.data.max_length, pad_id, cfg.data.share_prefixes)


def units(example) -> int:
    return example.n_labels


def prepare(model, method, cfg, data, device, pad_id: int, ctx: RunContext) -> None:
    return None


def compare(before: dict, after: dict) -> dict[str, tuple[float, float]]:
    import math

    return {"held-out loss": (before["loss"], after["loss"]),
            "held-out perplexity": (math.exp(before["loss"]), math.exp(after["loss"]))}


def save(model, method, cfg, folder) -> None:
    method.save(model, cfg.method, folder, cfg.model.path)

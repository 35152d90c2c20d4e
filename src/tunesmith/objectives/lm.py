"""Next-token cross-entropy on labelled positions: SFT (assistant turns) and continued pretraining (all text).

Logits are computed only where a target exists, never for the whole (sequence × vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.templates import IGNORE


def _attention_mask_for(model, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.ndim == 4 and model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, L, H) aligned with batch["input_ids"].

    Virtual-token methods (prompt, prefix, P-tuning v2) attach `model.tunesmith_virtual`, which runs the
    decoder itself (adding its virtual tokens / key-value prefixes) and returns the same alignment.
    """
    virtual = getattr(model, "tunesmith_virtual", None)
    if virtual is not None:
        return virtual.hidden_states(model, batch)
    decoder = model.get_decoder()
    dtype = next(model.parameters()).dtype
    out = decoder(
        input_ids=batch["input_ids"],
        attention_mask=_attention_mask_for(model, batch["attention_mask"], dtype),
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out.last_hidden_state


def logits_at(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
    targets = batch["targets"]
    where = targets != IGNORE
    hidden = hidden_states(model, batch)[where]
    logits = logits_at(model, hidden)
    loss = F.cross_entropy(logits.float(), targets[where], reduction="sum")
    return loss, int(where.sum()), {}

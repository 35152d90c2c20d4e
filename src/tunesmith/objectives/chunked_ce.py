"""LM head + cross-entropy over label positions, a chunk of positions at a time.

The plain path keeps the (label positions × vocabulary) logits, and autograd keeps their softmax for the backward
pass. Here each chunk's logits live only while that chunk is processed: the forward pass also forms the gradient
with respect to the hidden states (and the head's weight, when it trains) chunk by chunk, and the backward pass only
scales those by the incoming gradient. The loss is the same sum of per-token cross-entropies; only the order of the
floating-point summation differs. A model that soft-caps its final logits (Gemma-2: cap · tanh(logits / cap)) has
them capped chunk by chunk too, and each chunk's logit gradient scaled by the cap's slope, 1 − tanh².

DPO and PPO need each labelled token's log-probability rather than their sum (`linear_token_logps`): there the
gradient of a row depends on that row's incoming gradient, so the backward pass recomputes each chunk's logits from
the saved log-sum-exp instead of forming the gradient ahead.

Each chunk's logits are written into a workspace that lives as long as the caller keeps it (the model keeps one), so
the vocabulary-wide buffers are allocated once, not once per chunk: fresh buffers that large cost the CPU a page
fault per 4 KiB on first touch, which measured more than their matrix product.
"""

from __future__ import annotations

import torch

from tunesmith.kernels import onednn_linear


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """What an nn.Linear would compute in here: the autocast dtype when autocast is on, else the weight's dtype."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class Workspace:
    """Reusable (chunk × vocabulary) buffers: fp32 logits, plus one in the compute dtype when that is lower.
    `onednn`: fp32 products on CPU go through oneDNN (kernels/onednn_linear.py), which writes fresh logits."""

    def __init__(self, onednn: bool = False) -> None:
        self.onednn = onednn
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._weight: tuple | None = None

    def buffer(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device, slot: str = "chunk"
               ) -> torch.Tensor:
        key = (slot, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            self._buffers.pop(key, None)
            buf = self._buffers[key] = torch.empty((rows, cols), dtype=dtype, device=device)
        return buf[:rows]

    def weight_in(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`weight` in `dtype`; a frozen weight is cast once and reused until it changes."""
        if weight.dtype == dtype:
            return weight
        if weight.requires_grad:
            return weight.to(dtype)
        key = (weight.data_ptr(), weight._version, dtype)
        if self._weight is None or self._weight[0] != key:
            self._weight = (key, weight.detach().to(dtype))
        return self._weight[1]


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, space: Workspace) -> torch.Tensor:
    """fp32 logits of one chunk: from oneDNN for fp32 on CPU (kernels/onednn_linear.py), else in the workspace."""
    if space.onednn and onednn_linear.applies(h, w):
        return onednn_linear.product(h, w)
    logits = space.buffer(h.shape[0], w.shape[0], torch.float32, h.device)
    if h.dtype == torch.float32:
        return torch.mm(h, w.T, out=logits)
    low = torch.mm(h, w.T, out=space.buffer(h.shape[0], w.shape[0], h.dtype, h.device))
    return logits.copy_(low)


def _softcapped_(logits: torch.Tensor, cap: float | None, space: Workspace) -> torch.Tensor | None:
    """cap · tanh(logits / cap) written over `logits`; returns the slope 1 − tanh² (in the workspace), for the
    gradient (None without a cap: nothing changes)."""
    if not cap:
        return None
    tanh = logits.div_(cap).tanh_()
    slope = torch.mul(tanh, tanh, out=space.buffer(*logits.shape, torch.float32, logits.device, slot="softcap"))
    tanh.mul_(cap)
    return slope.neg_().add_(1.0)


def _loss_and_softmax_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropies, and the softmax written over `logits` in place (no second vocabulary-wide tensor)."""
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()
    norm = probs.sum(dim=-1, keepdim=True)
    loss = (norm.log() + top).squeeze(1).sub_(target_logits).sum()
    return loss, probs.div_(norm)


def weight_grad_rows(chunk: int) -> int:
    """Rows of logit gradients a trained head's low-precision weight gradient takes in one product: whole chunks,
    at least WEIGHT_GRAD_ROWS of them."""
    return max(1, -(-WEIGHT_GRAD_ROWS // chunk)) * chunk


# Below fp32 the weight gradient's product cannot accumulate into the fp32 gradient (no mixed-precision addmm on
# CPU), so each product is added to it in a pass over (vocabulary × hidden) fp32, ~20 ms for SmolLM2's head on a
# 2-core box; the chunks' bf16 logit gradients are therefore held until this many rows are ready for one product
# (workload 3 of bench/peers.py in bf16, in-process, alternating: 1305–1447 against 1251–1291 tokens/s).
WEIGHT_GRAD_ROWS = 1024


class _HeadWeightGradient:
    """A trained head's fp32 weight gradient, the sum over chunks of (logit gradient)ᵀ · hidden: in fp32 one addmm_
    per chunk, below it one product per `weight_grad_rows` rows, whose logit gradients wait in the workspace."""

    def __init__(self, weight, hidden, chunk: int, dtype: torch.dtype, space: Workspace) -> None:
        # no rows, no chunk to overwrite it: zeros (DPO's backward allocated zeros before this class)
        self.grad = (torch.empty_like if hidden.shape[0] else torch.zeros_like)(weight, dtype=torch.float32)
        self.hidden, self.dtype, self.chunk, self.space = hidden, dtype, chunk, space
        self.held_rows = min(weight_grad_rows(chunk), hidden.shape[0]) if dtype != torch.float32 else 0
        self.held_from = 0  # the first row whose logit gradient is held
        self.started = False

    def logit_grad_slot(self, start: int, rows: int, vocab: int) -> torch.Tensor | None:
        """Where chunk `start`'s low-precision logit gradient is to be written (None in fp32)."""
        if not self.held_rows:
            return None
        held = self.space.buffer(self.held_rows, vocab, self.dtype, self.hidden.device, slot="weight gradient")
        return held[start - self.held_from : start - self.held_from + rows]

    def add(self, start: int, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        """Count chunk `start` (its logit gradient, its hidden rows `h` in the compute dtype)."""
        if not self.held_rows:  # beta 0 on the first chunk overwrites the uninitialised buffer
            self.grad.addmm_(grad_logits.T, h, beta=1.0 if self.started else 0.0)
            self.started = True
            return
        end = start + h.shape[0]
        if end - self.held_from + self.chunk <= self.held_rows and end < self.hidden.shape[0]:
            return  # the next chunk still fits
        held = self.space.buffer(self.held_rows, grad_logits.shape[1], self.dtype, h.device, slot="weight gradient")
        product = held[: end - self.held_from].T @ self.hidden[self.held_from : end].to(self.dtype)
        self.grad.add_(product) if self.started else self.grad.copy_(product)
        self.started, self.held_from = True, end


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype, space: Workspace, cap: float | None):
        w = space.weight_in(weight, dtype)
        grad_hidden = torch.empty_like(hidden)
        head = _HeadWeightGradient(weight, hidden, chunk, dtype, space) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            logits = _chunk_logits(h, w, space)
            slope = _softcapped_(logits, cap, space)
            loss, grad_logits = _loss_and_softmax_(logits, t)
            total += loss
            # d(sum of cross-entropies)/d(logits) = softmax − one-hot(target)
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if slope is not None:
                grad_logits.mul_(slope)
            grad_logits = _in_compute_dtype(grad_logits, start, head, dtype, space)
            if space.onednn and onednn_linear.applies(grad_logits, w):
                grad_hidden[start : start + chunk] = onednn_linear.input_grad(grad_logits, w)
            else:
                grad_hidden[start : start + chunk] = (grad_logits @ w).to(hidden.dtype)
            if head is not None:
                head.add(start, grad_logits, h)
        grad_weight = head.grad if head is not None else None
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_h, grad_w, None, None, None, None, None


def _in_compute_dtype(grad_logits: torch.Tensor, start: int, head: _HeadWeightGradient | None,
                      dtype: torch.dtype, space: Workspace) -> torch.Tensor:
    """The fp32 logit gradient of chunk `start` in the products' dtype: in the trained head's held rows, else in the
    workspace's chunk buffer (fp32: as it is)."""
    if dtype == torch.float32:
        return grad_logits
    slot = head.logit_grad_slot(start, *grad_logits.shape) if head is not None else None
    if slot is None:
        slot = space.buffer(grad_logits.shape[0], grad_logits.shape[1], dtype, grad_logits.device)
    return slot.copy_(grad_logits)


def balanced_chunk(rows: int, chunk: int) -> int:
    """The chunk size that splits `rows` into as many chunks as `chunk` would, all of nearly equal size: a short
    last chunk (1024 + 169 rows) runs its vocabulary-wide products at well below the long chunks' rate (measured
    50–90 against ~140 GFLOP/s for 22–169 rows on workload 1's head)."""
    if rows <= chunk:
        return max(rows, 1)
    pieces = -(-rows // chunk)
    return -(-rows // pieces)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                             workspace: Workspace | None = None, softcap: float | None = None) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ weight.T, targets); hidden (N, H), weight (V, H), targets (N,);
    with `softcap`, of cross_entropy(softcap · tanh(hidden @ weight.T / softcap), targets)."""
    dtype = _compute_dtype(weight)
    space = workspace if workspace is not None else Workspace()
    chunk = balanced_chunk(hidden.shape[0], chunk)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        w = space.weight_in(weight, dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start : start + chunk].to(dtype), w, space)
            _softcapped_(logits, softcap, space)
            total += _loss_and_softmax_(logits, targets[start : start + chunk])[0]
        return total
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk, dtype, space, softcap)


def _logps_and_softmax_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """Per-row log-probability of the target, log-sum-exp, and the softmax written over `logits` in place."""
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()
    norm = probs.sum(dim=-1, keepdim=True)
    lse = (norm.log() + top).squeeze(1)
    return target_logits - lse, lse, probs.div_(norm)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[row, target] per row. The gradient depends on each row's incoming gradient, so
    the backward pass recomputes each chunk's logits (from the saved log-sum-exp) instead of keeping them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype, space: Workspace, cap: float | None):
        w = space.weight_in(weight, dtype)
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            logits = _chunk_logits(h, w, space)
            _softcapped_(logits, cap, space)
            logp, chunk_lse, _ = _logps_and_softmax_(logits, targets[start : start + chunk])
            logps[start : start + chunk], lse[start : start + chunk] = logp, chunk_lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype, ctx.space, ctx.cap = chunk, dtype, space, cap
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, dtype, space = ctx.chunk, ctx.dtype, ctx.space
        w = space.weight_in(weight, dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        head = _HeadWeightGradient(weight, hidden, chunk, dtype, space) if ctx.needs_input_grad[1] else None
        grad_logps = grad_logps.float()
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t, g = targets[start : start + chunk], grad_logps[start : start + chunk]
            logits = _chunk_logits(h, w, space)
            slope = _softcapped_(logits, ctx.cap, space)
            probs = logits.sub_(lse[start : start + chunk, None]).exp_()
            # d log p(target) / d logits = one-hot(target) − softmax
            grad_logits = probs.mul_(-g[:, None])
            grad_logits[torch.arange(t.shape[0], device=t.device), t] += g
            if slope is not None:
                grad_logits.mul_(slope)
            grad_logits = _in_compute_dtype(grad_logits, start, head, dtype, space)
            if grad_hidden is not None:
                if space.onednn and onednn_linear.applies(grad_logits, w):
                    grad_hidden[start : start + chunk] = onednn_linear.input_grad(grad_logits, w)
                else:
                    grad_hidden[start : start + chunk] = (grad_logits @ w).to(hidden.dtype)
            if head is not None:
                head.add(start, grad_logits, h)
        grad_w = head.grad.to(weight.dtype) if head is not None else None
        return grad_hidden, grad_w, None, None, None, None, None


@torch.no_grad()
def _token_logps_no_grad(hidden, weight, targets, chunk: int, dtype: torch.dtype, space: Workspace, entropy: bool,
                         cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = space.weight_in(weight, dtype)
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    entropies = torch.empty_like(logps) if entropy else None
    for start in range(0, hidden.shape[0], chunk):
        logits = _chunk_logits(hidden[start : start + chunk].to(dtype), w, space)
        _softcapped_(logits, cap, space)
        logp, _, probs = _logps_and_softmax_(logits, targets[start : start + chunk])
        logps[start : start + chunk] = logp
        if entropies is not None:
            entropies[start : start + chunk] = -torch.xlogy(probs, probs).sum(-1)
    return logps, entropies


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                       workspace: Workspace | None = None, entropy: bool = False, softcap: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: log softmax(hidden @ weight.T)[target], fp32 (N,), differentiable; and, with `entropy`, each row's
    entropy of that softmax (detached: it is a metric). hidden (N, H), weight (V, H), targets (N,); `softcap` as in
    linear_cross_entropy_sum."""
    dtype = _compute_dtype(weight)
    space = workspace if workspace is not None else Workspace()
    chunk = balanced_chunk(hidden.shape[0], chunk)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        return _token_logps_no_grad(hidden, weight, targets, chunk, dtype, space, entropy, softcap)
    logps = _LinearTokenLogps.apply(hidden, weight, targets, chunk, dtype, space, softcap)
    entropies = (_token_logps_no_grad(hidden, weight, targets, chunk, dtype, space, True, softcap)[1] if entropy
                 else None)
    return logps, entropies

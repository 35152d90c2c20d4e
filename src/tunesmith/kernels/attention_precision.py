"""In which precision segment attention runs on a CPU under bf16 autocast.

PyTorch's CPU flash-attention kernel computes bf16 inputs in bf16 tiles. Its forward + backward is slower than
fp32's on short segments and faster on long ones where the CPU has AMX tiles (Intel Xeon Sapphire Rapids, 2 cores,
torch 2.13, SmolLM2's 9 query / 3 key-value heads of 64, `bench/attention_precision.py`: bf16 / fp32 = 3.21 at 64
tokens, 2.14 at 128, 1.09 at 256, 0.95 at 384, 0.86 at 512, 0.64 at 1,024). Without AMX (AMD Zen 5 has AVX512-BF16
but no tiles) every segment is upcast to fp32: an earlier session measured bf16's backward 2× slower on short
segments there; the crossover on such a CPU is unmeasured. The choice is a fixed rule of the CPU's flags and the segment's length, never a timing
taken at run time, so one config gives the same numbers on every run of a
machine (and a resumed run continues exactly).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F

# shortest segment that runs in bf16 on an AMX CPU; below it the upcast to fp32 is faster (measured, see above)
AMX_BF16_FROM = 384


@functools.cache
def cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def bf16_on_cpu(length: int) -> bool:
    """Whether a CPU segment of `length` tokens keeps bf16 inputs rather than being upcast to fp32."""
    return length >= AMX_BF16_FROM and cpu_has_amx_bf16()


def time_attention(length: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                   repeats: int = 20) -> float:
    """Median seconds of one causal SDPA forward + backward on a (1, heads, length, head_dim) segment."""
    generator = torch.Generator().manual_seed(0)

    def tensor(h: int) -> torch.Tensor:
        return torch.randn(1, h, length, head_dim, generator=generator).to(dtype).requires_grad_()

    query, key, value = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    gqa = {"enable_gqa": True} if heads != kv_heads else {}
    seconds = []
    for attempt in range(repeats + 3):
        started = time.perf_counter()
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, **gqa)
        out.sum().backward()
        if attempt >= 3:
            seconds.append(time.perf_counter() - started)
        query.grad = key.grad = value.grad = None
    return statistics.median(seconds)

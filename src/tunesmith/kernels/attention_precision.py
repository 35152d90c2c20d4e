"""In which precision segment attention runs on a CPU under bf16 autocast.

PyTorch's CPU flash-attention kernel computes bf16 inputs in bf16 tiles. Its forward + backward is slower than
fp32's on short segments and faster on long ones; where the crossover lies depends on the CPU kind, measured with
`bench/attention_precision.py` (2 cores, torch 2.13, SmolLM2's 9 query / 3 key-value heads of 64; bf16 / fp32 time):

| tokens | Intel Xeon Sapphire Rapids (AMX) | AMD EPYC Zen 5 (AVX512-BF16, no AMX; 2026-12-07) |
|---:|---:|---:|
| 32 | | 2.82 |
| 64 | 3.21 | 2.59 |
| 128 | 2.14 | 1.95 |
| 256 | 1.09 | 1.17 |
| 384 | 0.95 | |
| 512 | 0.86 | 0.88 |
| 1,024 | 0.64 | 0.72 |

So segments from 384 tokens keep bf16 on an AMX CPU and from 512 on AMD Zen 5; on every other kind (AMD Zen 4, whose
AVX512-BF16 runs at half Zen 5's width, is unmeasured) every segment is upcast to fp32, as before. The choice is a
fixed rule of the CPU's kind and the segment's length, never a timing taken at run time, so one config gives the same
numbers on every run of a machine (and a resumed run continues exactly).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F

# shortest segment that runs in bf16, per CPU kind (measured, see above); a kind not listed upcasts every segment
BF16_FROM = {"amx": 384, "zen5": 512}
AMX_BF16_FROM = BF16_FROM["amx"]


@functools.cache
def _cpuinfo() -> tuple[str, int, frozenset]:
    """(vendor, family, flags) of the first CPU in /proc/cpuinfo; empty where there is none."""
    vendor, family, flags = "", -1, frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "cpu family" and family < 0:
                    family = int(value.strip() or -1)
                elif key == "flags":
                    flags = frozenset(value.split())
                    break
    except (OSError, ValueError):
        pass
    return vendor, family, flags


def cpu_has_amx_bf16() -> bool:
    return "amx_bf16" in _cpuinfo()[2]


def cpu_kind() -> str:
    """"amx" (Intel with AMX-BF16 tiles), "zen5" (AMD family 26 with AVX512-BF16), else "other"."""
    vendor, family, flags = _cpuinfo()
    if cpu_has_amx_bf16():
        return "amx"
    if vendor == "AuthenticAMD" and family == 26 and "avx512_bf16" in flags:
        return "zen5"
    return "other"


def bf16_on_cpu(length: int) -> bool:
    """Whether a CPU segment of `length` tokens keeps bf16 inputs rather than being upcast to fp32."""
    start = BF16_FROM.get(cpu_kind())
    return start is not None and length >= start


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

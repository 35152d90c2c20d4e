"""Causal SDPA forward + backward on CPU in bf16 against fp32, by segment length: where bf16 attention pays.

    PYTHONPATH=src python bench/attention_precision.py [--lengths 64,128,256,512,1024] [--heads 9 --kv-heads 3]

Shapes are SmolLM2-135M's attention (9 query heads, 3 key/value heads, head dim 64) on one segment, as
kernels/segment_attention.py calls it. Prints ms per forward + backward in each precision and the ratio; the
crossover is what `kernels/attention_precision.py` measures at run time on the machine it runs on.
"""

from __future__ import annotations

import argparse
import platform

import torch

from tunesmith.kernels.attention_precision import time_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="64,128,256,512,1024")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| segment tokens | fp32 ms | bf16 ms | bf16 / fp32 |\n|---:|---:|---:|---:|")
    for n in (int(x) for x in args.lengths.split(",")):
        fp32 = time_attention(n, args.heads, args.kv_heads, args.head_dim, torch.float32, args.repeats)
        bf16 = time_attention(n, args.heads, args.kv_heads, args.head_dim, torch.bfloat16, args.repeats)
        print(f"| {n} | {fp32 * 1e3:.2f} | {bf16 * 1e3:.2f} | {bf16 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()

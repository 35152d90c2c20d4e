"""`--device` and `--dtype` of every command that loads a model to answer or to merge: where the model computes,
and in which dtype its weights load."""

from __future__ import annotations

import argparse


def add_device_arg(p: argparse.ArgumentParser, what: str = "the model runs") -> None:
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where {what}: auto (CUDA, else Apple's MPS, else the CPU; the default), cpu, cuda, cuda:N "
                   "or mps")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the dtype the model's weights load in: bfloat16 takes half the memory of float32, at lower "
                   "precision")

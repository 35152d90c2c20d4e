"""`--device` of every command that loads a model to answer or to merge: where the model computes."""

from __future__ import annotations

import argparse


def add_device_arg(p: argparse.ArgumentParser, what: str = "the model runs") -> None:
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where {what}: auto (CUDA, else Apple's MPS, else the CPU; the default), cpu, cuda, cuda:N "
                   "or mps")

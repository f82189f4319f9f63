"""The course's `utils` name, holding only what is truly general: seeding and device choice.

Box math lives in `boxes`, decoding and NMS in `postprocess`, metrics in `metrics`, plots in
`plotting`: import them from there.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def pick_device(prefer: str | None = None) -> torch.device:
    """`prefer` if given, else CUDA, then Apple's MPS, then CPU."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

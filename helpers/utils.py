"""The course's `utils` name, holding only what is truly general: seeding, device choice, handing GPU
memory back, and telling a network failure from other errors.

Box math lives in `boxes`, decoding and NMS in `postprocess`, metrics in `metrics`, plots in
`plotting`: import them from there.
"""
from __future__ import annotations

import gc
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


def free_gpu_memory() -> None:
    """Collect garbage and return the CUDA caching allocator's unused blocks to the driver, so that
    another process (a DDP child training on the same GPU) can use them."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def network_failure(e: BaseException) -> bool:
    """Whether `e` says a server could not be reached (no network, no DNS, a timeout): the standard
    library's errors and the HTTP clients' (requests', httpx's under whichever module name a library
    vendors it), recognised by their class names so that none of them needs importing here."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "TimeoutError", "Timeout", "TransportError", "NetworkError",
                         "TimeoutException", "gaierror"})

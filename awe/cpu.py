"""What the CPU offers (bf16 products, AMX) and how many threads the libraries use."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from awe.errors import invalid


def check_int(field: str, value, minimum: int, optional: bool = False) -> None:
    """``value`` of option ``field`` is an integer >= ``minimum`` (or None, if ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise invalid(field, f"must be an integer >= {minimum}, got {value!r}")


def set_threads(n: int | None) -> None:
    """Use ``n`` threads for faiss and torch (exact search runs in torch; all cores when None:
    the libraries' defaults)."""
    if n is None:
        return
    check_int("threads", n, 1)
    import faiss
    import torch

    faiss.omp_set_num_threads(int(n))
    torch.set_num_threads(int(n))


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16, from
    Linux's /proc/cpuinfo flags). Elsewhere torch emulates bf16 products, slower than float32,
    so ``auto`` does not choose the ``bf16`` index there."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 products (``amx_bf16``)."""
    return "amx_bf16" in cpu_flags()


@functools.cache
def cpu_flags() -> set[str]:
    try:
        return cpuinfo_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return set()


def cpuinfo_flags(text: str) -> set[str]:
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                     if line.startswith("flags")), []))

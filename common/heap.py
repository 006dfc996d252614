"""A worker's memory: the C heap's large blocks reused instead of mapped afresh, and the GPU
memory that the process can still take.

glibc's malloc serves blocks above 32 MB with a fresh mmap and unmaps them when freed, so every
large tensor that the attacks make (the rivals' rows W[t] - W[k] of a chunk: 100-700 MB, copied
as pairs leave and rivals join) is paid again in page faults, one per 4 KB: on the development
machine a 126 MB copy took 102 ms into new memory and 15 ms into memory already used.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
LARGEST = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Serve every block from the heap and keep what is freed there (the process keeps its peak
    memory). For the attack workers, which run one job each. Returns False where the C library
    is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST))


def gpu_free(device) -> int:
    """Bytes this process can still take on a CUDA device: the driver's free memory plus what
    PyTorch's caching allocator holds unused (freed tensors kept for reuse, which the driver counts
    as taken: after a 65,536-pair sign attack, most of an H100)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

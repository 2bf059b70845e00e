"""Giving memory back to the operating system.

glibc's allocator keeps large freed blocks mapped for reuse, so a process that once held a big temporary (a model
being unpacked, a multi-megabyte request) keeps that resident size long after. malloc_trim hands it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util


def return_freed_memory() -> None:
    """Release freed allocator memory to the system (a no-op where the C library is not glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)

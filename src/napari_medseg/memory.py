"""Keeping a long run's memory flat: how many heaps glibc's allocator may keep.

glibc gives each thread that allocates while another holds the main heap an arena of its own
(up to 8 per core), and memory freed in an arena is seldom handed back to the system. A slide run
allocates block-sized arrays from several threads (the runtime's, the TIFF writer's, numpy's), so
its resident memory crept up over the run: a 16384² slide peaked at 1.45-1.47 GiB with glibc's
default and at 1.28 GiB with two arenas (four: 1.43), at the same speed (73 s). A thread keeps the
arena it first got, so the limit is set where a slide run's process starts, before the runtime's
threads exist (set later, in the run itself, it changed nothing: 1.45 GiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

SLIDE_RUN_ARENAS = 2  # heaps a slide run may keep; the measured flat peak (see above)
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_allocator_arenas(count: int = SLIDE_RUN_ARENAS) -> bool:
    """At most ``count`` glibc arenas in this process from now on (existing threads keep theirs);
    False where the C library is not glibc (macOS, Windows, musl), which is left alone."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(mallopt(_M_ARENA_MAX, count))

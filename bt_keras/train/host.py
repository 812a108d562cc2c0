"""Host (CPU) start-up settings for training: threads and the memory allocator.

Call `configure_host()` first thing in a training script, before TensorFlow creates any tensor (importing
TensorFlow or bt_keras before it is fine):

    >>> from bt_keras import perf
    >>> perf.configure_host()   # {"intra_op": 2, "inter_op": 0, "applied": True, ...}: log it (0: TF default)
    >>> ...                     # build the model, fit

What it does, and why (measured numbers: README, "Performance"):

* Threads. `configure_threads()` sets intra-op threads (one op's parallelism; oneDNN runs on this pool) to the
  usable cores (`usable_cores()`, the affinity mask) and leaves inter-op (ops run at once) at TensorFlow's default,
  the number of cores (on 2 cores, inter-op 1 and 2 measured the same within noise on both benchmark presets).
  TensorFlow refuses changes after its runtime has started; the report then says `"applied": False`.

* Memory allocator. TensorFlow's x86 wheels (oneDNN build) serve CPU tensors of 256 KiB and more from their own BFC
  pool (`MklCPUAllocator`), which grows to the step's high-water mark and keeps it: no page faults in the steady
  state, unlike PyTorch on glibc's default malloc, and the lowest peak memory we measured; `configure_host()` keeps
  it. Smaller tensors, and all tensors with `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=true` (`allocator="system"`, or
  TensorFlow builds without oneDNN), come from glibc malloc, which by default serves big blocks with their own
  `mmap` and unmaps them when freed, so each step page-faults them back in (~1 million faults, 10-15% of the step,
  on `cifar`). `tune_malloc()` counters that at run time with `mallopt` (no environment variable, no re-exec): no
  `mmap` for large blocks, no trimming, one arena; the run-time equivalent of starting Python with

      MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615 MALLOC_TOP_PAD_=1073741824 MALLOC_ARENA_MAX=1

  (`ALLOCATOR_ENV`, for programs that cannot call `tune_malloc` early). It cuts the faults by 10-20x but not to zero,
  and glibc's heap fragments more than TensorFlow's pool (higher peak), so prefer the pool where it exists. Only
  glibc has `mallopt`; elsewhere (musl, macOS, a preloaded tcmalloc/jemalloc) `tune_malloc` returns False.

Why no automatic re-exec of the trainer with `MALLOC_*` set: `mallopt` gives the same result from inside the process,
while re-executing breaks debuggers, notebooks, `python -c`, process supervisors and multi-worker launchers that track
the child's PID, and silently runs a second interpreter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

DEFAULT_TOP_PAD = 1 << 30  # 1 GiB: grow the heap in large steps, so growing costs few system calls

ALLOCATOR_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**64 - 1),  # "never trim"; glibc reads it as a size_t
    "MALLOC_TOP_PAD_": str(DEFAULT_TOP_PAD),
    "MALLOC_ARENA_MAX": "1",
}
"""The environment equivalent of `tune_malloc()`, for launching a process (glibc reads it at start-up)."""

def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(top_pad: int = DEFAULT_TOP_PAD, arenas: int | None = 1) -> bool:
    """Keeps glibc malloc from returning freed memory to the system; True when applied.

    `mallopt(M_MMAP_MAX, 0)`: large blocks come from the heap, not from their own `mmap`; `mallopt(M_TRIM_THRESHOLD,
    -1)`: the heap is never trimmed (glibc stores the threshold as a size_t, so -1 means "infinite"; a finite one
    such as 2 GiB is exceeded when a step frees its activations, and every step then page-faults them back in);
    `mallopt(M_TOP_PAD, top_pad)`: the heap grows in large steps; `mallopt(M_ARENA_MAX, arenas)`: TensorFlow's
    worker threads share the main heap (glibc >= 2.35 serves a block larger than a thread arena's 64 MiB heap with
    its own `mmap` whatever M_MMAP_MAX says, and unmaps it on free). Freed memory is then reused by the next step, and
    the resident memory stays at the high-water mark. Safe to call at any time (blocks already mapped are
    unaffected) and more than once; best called before the model is built.
    """
    libc = _glibc()
    if libc is None:
        return False
    if any(v in os.environ.get("LD_PRELOAD", "") for v in ("tcmalloc", "jemalloc", "mimalloc")):
        return False  # another allocator serves malloc: glibc's settings would do nothing.
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    ok &= libc.mallopt(_M_TOP_PAD, min(int(top_pad), 2**31 - 1)) == 1
    if arenas is not None:
        ok &= libc.mallopt(_M_ARENA_MAX, int(arenas)) == 1
    return bool(ok)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(intra_op: int | None = None, inter_op: int | None = None) -> dict:
    """Sets TensorFlow's intra-op (per-op parallelism) and inter-op (concurrent ops) thread counts.

    Args:
      intra_op: threads one op may use; default: `usable_cores()`.
      inter_op: ops that may run at once; None (default) leaves TensorFlow's default, the number of cores.

    Returns the values in force (0: TensorFlow's default), with `"applied": False` when TensorFlow had already
    started (too late to change).
    """
    import tensorflow as tf

    intra_op = usable_cores() if intra_op is None else int(intra_op)
    applied = True
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op is not None:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter_op))
    except RuntimeError:  # "... cannot be modified after initialization"
        applied = False
    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        "applied": applied,
    }


def _tensorflow_started() -> bool:
    """True once TensorFlow has initialised its runtime (devices, thread pools, allocators)."""
    if "tensorflow" not in sys.modules:
        return False
    try:
        from tensorflow.python.eager import context

        return bool(context.context()._initialized)
    except (ImportError, AttributeError):  # another TensorFlow version: assume the worst
        return True


def use_system_allocator() -> bool:
    """Makes TensorFlow's oneDNN build take every CPU tensor from malloc instead of its own pool; True if in force.

    TensorFlow's x86 wheels serve CPU tensors of 256 KiB and more from a BFC pool (`MklCPUAllocator`) that grows and
    never shrinks; with `tune_malloc()`, glibc's heap keeps and reuses the same memory with less fragmentation (peak
    memory: README, "Performance"). Sets `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=true`, which TensorFlow reads at its first
    allocation, so this must run before TensorFlow creates any tensor (importing it is fine). A value the user set
    is kept. Returns False when TensorFlow has already started and the setting could not take effect.
    """
    if "TF_ONEDNN_USE_SYSTEM_ALLOCATOR" not in os.environ:
        if _tensorflow_started():
            return False
        os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = "true"
    return os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"].strip().lower() in ("1", "true")


def configure_host(threads: int | None = None, inter_op: int | None = None, allocator: str | None = "pool") -> dict:
    """Start-up settings for training on this host; call first thing, before TensorFlow creates any tensor.

    Args:
      threads: intra-op threads (default: the usable cores).
      inter_op: ops that may run at once (default None: TensorFlow's default, the number of cores).
      allocator: "pool" (default): keep TensorFlow's own pool for tensors >= 256 KiB, which already avoids per-step
        page faults and gave the lowest peak memory here; malloc is left alone (`tune_malloc` on top gained nothing
        and kept ~0.5 GiB more resident on `imagenet_small`). "system": every tensor from glibc malloc
        (`use_system_allocator`) tuned by `tune_malloc()`, for builds without oneDNN's pool. None: change nothing.
        README, "Performance", has the measurements.

    Returns what was applied, e.g. `{"system_allocator": False, "malloc_tuned": False, "intra_op": 2, "inter_op": 0,
    "applied": True}`, so a trainer can log it. Environment variables set by the user win over these defaults.
    """
    if allocator not in ("system", "pool", None):
        raise ValueError(f"configure_host: allocator must be 'pool', 'system' or None, got {allocator!r}.")
    system = allocator == "system" and use_system_allocator()
    report = {"system_allocator": system, "malloc_tuned": tune_malloc() if system else False}
    report.update(configure_threads(threads, inter_op))
    return report

"""Native CPU kernels, compiled on first use against the installed TensorFlow and cached.

One kernel so far, `lars_update` (source: lars_update.cc): the whole LARS step of one variable in two passes over
memory instead of TensorFlow's ~14, which halves the optimizer's time on the large projector kernels (see
benchmarks/README.md). `bt_keras.optim.LARS` uses it on CPU when it is available and falls back to TensorFlow ops
otherwise (GPU/TPU variables, XLA-compiled steps, no compiler), with the same results.

Building needs a C++17 compiler (`$CXX`, else `c++`/`g++`) and TensorFlow's headers, which the TensorFlow wheel
ships; it takes ~10 s once per TensorFlow version. The library is cached in `$BT_KERAS_CACHE_DIR`, else
`$XDG_CACHE_HOME/bt_keras`, else `~/.cache/bt_keras`, under a name that hashes the source, the TensorFlow version and
the flags, and is written atomically (concurrent first uses by several workers are safe). `BT_KERAS_NATIVE=0` turns
the kernels off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

from absl import logging

from bt_keras.io import atomic_write

_SOURCE = Path(__file__).with_name("lars_update.cc")
_lock = threading.Lock()
_state: dict = {}  # after the first lars_update(): {"op": the op function or None, "reason": why it is None}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("BT_KERAS_CACHE_DIR"):
        return Path(os.environ["BT_KERAS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bt_keras"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build_command(tf, compiler: str, output: str) -> list[str]:
    return [
        compiler, "-shared", "-fPIC", "-O3", "-fopenmp-simd", "-w",
        *tf.sysconfig.get_compile_flags(),  # TensorFlow's headers, C++ standard and ABI flags
        str(_SOURCE), "-o", output,
        *tf.sysconfig.get_link_flags(),
    ]


def _library_path(tf, compiler: str) -> Path:
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join([tf.__version__, tf.sysconfig.get_build_info().get("cpu_compiler", ""), compiler,
                         *_build_command(tf, compiler, "")]).encode())
    return cache_dir() / f"lars_update-{key.hexdigest()[:16]}.so"


def _build(tf) -> Path:
    """Compiles lars_update.cc into the cache (atomically) unless it is there; returns the library's path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    path = _library_path(tf, compiler)
    if path.exists():
        return path

    def compile_to(output: str) -> None:
        logging.info("bt_keras: compiling the LARS CPU kernel (once per TensorFlow version) into %s", path)
        result = subprocess.run(_build_command(tf, compiler, output), capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"the compiler failed:\n{result.stderr[-2000:]}")

    atomic_write(path, compile_to, suffix=".so")  # another process sees no library or a complete one
    return path


def _load() -> tuple[object, str | None]:
    if os.environ.get("BT_KERAS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off by BT_KERAS_NATIVE=0"
    import tensorflow as tf

    try:
        return tf.load_op_library(str(_build(tf))).bt_keras_lars_update, None
    except Exception as error:  # no compiler, no headers, unwritable cache, ABI mismatch...
        reason = f"{type(error).__name__}: {error}"
        logging.warning("bt_keras: the native LARS kernel is unavailable (%s); using TensorFlow ops, same results, "
                        "slower on large layers. Set BT_KERAS_NATIVE=0 to silence this.", reason)
        return None, reason


def lars_update():
    """The compiled `BtKerasLarsUpdate` op function, or None when native kernels are off or cannot be built.

    Built and loaded on the first call only; a failure is logged once as a warning with its reason, and LARS then
    uses TensorFlow ops.
    """
    with _lock:
        if not _state:
            _state["op"], _state["reason"] = _load()
    return _state["op"]


def unavailable_reason() -> str | None:
    """Why `lars_update()` returned None (after it was called), else None."""
    return _state.get("reason")

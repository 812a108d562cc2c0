"""Native CPU kernels, compiled on first use against the installed TensorFlow and cached.

Two libraries so far:

* `lars_update` (source: lars_update.cc): the whole LARS step of one variable in two passes over memory instead of
  TensorFlow's ~14, which halves the optimizer's time on the large projector kernels (see benchmarks/README.md).
  `bt_keras.method.optim.LARS` uses it on CPU when it is available and falls back to TensorFlow ops otherwise (GPU/TPU
  variables, XLA-compiled steps, no compiler), with the same results.
* `batch_norm_ops` (source: batch_norm_sums.cc): per-channel sums and affine maps in one pass each, for the
  synchronised BatchNorm under several replicas (`bt_keras.nets.batch_norm`), with the same fallback.

Building needs a C++17 compiler (`$CXX`, else `c++`/`g++`) and TensorFlow's headers, which the TensorFlow wheel
ships; it takes ~10 s once per library and TensorFlow version. A library is cached in `$BT_KERAS_CACHE_DIR`, else
`$XDG_CACHE_HOME/bt_keras`, else `~/.cache/bt_keras`, under a name that hashes the source, the TensorFlow version and
the flags, and is written atomically. Processes that need a library at the same time (the workers of one host, test
workers) take turns on a lock file beside it, so one compiles and the others load its result (without the lock, three
at once compiled three times: 68 against 33 CPU-s, measured). `BT_KERAS_NATIVE=0` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

from absl import logging

from bt_keras.files import atomic_write

_SOURCE = Path(__file__).with_name("lars_update.cc")
_BATCH_NORM_SOURCE = Path(__file__).with_name("batch_norm_sums.cc")
_lock = threading.Lock()
_state: dict = {}  # after the first lars_update(): {"op": the op function or None, "reason": why it is None}
_batch_norm_state: dict = {}  # after the first batch_norm_ops(): {"ops": the op namespace or None, "reason": ...}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("BT_KERAS_CACHE_DIR"):
        return Path(os.environ["BT_KERAS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bt_keras"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build_command(tf, compiler: str, output: str, source: Path = _SOURCE) -> list[str]:
    return [
        compiler, "-shared", "-fPIC", "-O3", "-fopenmp-simd", "-w",
        *tf.sysconfig.get_compile_flags(),  # TensorFlow's headers, C++ standard and ABI flags
        str(source), "-o", output,
        *tf.sysconfig.get_link_flags(),
    ]


def _library_path(tf, compiler: str, source: Path = _SOURCE) -> Path:
    key = hashlib.sha256()
    key.update(source.read_bytes())
    key.update(" ".join([tf.__version__, tf.sysconfig.get_build_info().get("cpu_compiler", ""), compiler,
                         *_build_command(tf, compiler, "", source)]).encode())
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(tf, source: Path = _SOURCE) -> Path:
    """Compiles `source` into the cache (atomically) unless it is there; returns the library's path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    path = _library_path(tf, compiler, source)
    if path.exists():
        return path
    with _build_lock(path):
        if path.exists():  # another process built it while this one waited
            return path
        return _compile(tf, compiler, source, path)


@contextlib.contextmanager
def _build_lock(path: Path):
    """Holds an exclusive lock on `path`.lock across processes while one of them builds `path` (where `fcntl` exists:
    elsewhere each process builds, which the atomic write keeps safe)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _compile(tf, compiler: str, source: Path, path: Path) -> Path:
    """Compiles `source` into `path`, atomically (another process sees no library or a complete one)."""

    def compile_to(output: str) -> None:
        logging.info("bt_keras: compiling the native CPU kernels %s (once per TensorFlow version) into %s",
                     source.name, path)
        result = subprocess.run(_build_command(tf, compiler, output, source), capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"the compiler failed:\n{result.stderr[-2000:]}")

    atomic_write(path, compile_to, suffix=".so")
    return path


_override: bool | None = None  # set_enabled's choice; None: the environment's
_OFF_REASON = "turned off by BT_KERAS_NATIVE=0 (or kernels.set_enabled(False))"


def set_enabled(value: bool | None) -> None:
    """Turns the native kernels off (False: the TensorFlow-ops path that GPUs and TPUs run, as `BT_KERAS_NATIVE=0`)
    or on (True) for this process; None returns to the environment's choice. Read when a step is traced, so set it
    before training starts (tests use it to run the accelerator path on CPU)."""
    global _override
    if value not in (None, True, False):
        raise ValueError(f"kernels.set_enabled takes True, False or None, got {value!r}.")
    _override = value


def _turned_off() -> bool:
    if _override is not None:
        return not _override
    return os.environ.get("BT_KERAS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _load() -> tuple[object, str | None]:
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
    if _turned_off():
        return None
    with _lock:
        if not _state:
            _state["op"], _state["reason"] = _load()
    return _state["op"]


def unavailable_reason() -> str | None:
    """Why `lars_update()` returned None (after it was called), else None."""
    return _OFF_REASON if _turned_off() else _state.get("reason")


def batch_norm_ops():
    """The compiled per-channel ops of batch_norm_sums.cc (a module with `bt_keras_channel_moments`,
    `bt_keras_channel_grad_sums`, `bt_keras_channel_affine`, `bt_keras_channel_affine2`), or None when native kernels
    are off or cannot be built (then logged once as a warning with the reason; `batch_norm_unavailable_reason()`).
    """
    if _turned_off():
        return None
    with _lock:
        if not _batch_norm_state:
            import tensorflow as tf

            try:
                _batch_norm_state.update(ops=tf.load_op_library(str(_build(tf, _BATCH_NORM_SOURCE))), reason=None)
            except Exception as error:  # as for LARS: fall back to TensorFlow ops, say why once
                reason = f"{type(error).__name__}: {error}"
                logging.warning("bt_keras: the native BatchNorm kernels are unavailable (%s); synchronised "
                                "BatchNorm uses TensorFlow ops, same results, slower. Set BT_KERAS_NATIVE=0 to "
                                "silence this.", reason)
                _batch_norm_state.update(ops=None, reason=reason)
    return _batch_norm_state["ops"]


def batch_norm_unavailable_reason() -> str | None:
    """Why `batch_norm_ops()` returned None (after it was called), else None."""
    return _OFF_REASON if _turned_off() else _batch_norm_state.get("reason")


def unusable_reason(device: str) -> str | None:
    """Why a native CPU kernel cannot run for a tensor or variable on `device` in the op being built, else None.

    Not on a GPU/TPU device (nor on an unplaced tensor when accelerators are visible: the placer would put the
    computation there and copy), and not inside an XLA-compiled function, which fuses TensorFlow ops itself.
    """
    import tensorflow as tf

    name = (device or "").upper()
    if "GPU" in name or "TPU" in name:
        return f"the tensor is on {device} (the kernels are for CPU)"
    if "CPU" not in name and (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")):
        return "the tensor is not placed and accelerators are visible (the kernels are for CPU)"
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # private API moved: assume XLA is possible
        return "cannot tell whether the step is compiled with XLA"
    if control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()):
        return "the step is compiled with XLA (jit_compile=True), which fuses TensorFlow ops itself"
    return None

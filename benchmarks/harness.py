"""What the benchmark scripts share: FLOP counting, the matmul rate, process counters, machine facts, tables, JSON.

Importing this module imports neither TensorFlow nor bt_keras, and calling it loads TensorFlow only where it must
(benchmarks.train_step's parent process stays free of TensorFlow): `matmul_fn` takes `tf` as an argument, `count_flops`
imports Keras when called, `versions` reads their installed metadata. Usable cores: bt_keras.train.host.usable_cores.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

PRESETS = {
    # ResNet-18 with the CIFAR stem at 32 px, the CIFAR recipe's batch and projector.
    "cifar": dict(backbone="resnet18", stem="cifar", image_size=32, batch_size=256, projector="2048-2048-2048"),
    # ResNet-50 at 96 px with the paper's projector.
    "imagenet_small": dict(backbone="resnet50", stem="imagenet", image_size=96, batch_size=32,
                           projector="8192-8192-8192"),
}


def count_flops(model, batch_size: int) -> dict:
    """Training FLOPs per step, counted from the layers: 2 views x 3 x 2 x MACs + 3 x 2 x D^2 x batch."""
    import keras

    def macs(layer):
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in, _ = layer.kernel.shape
            return h * w * c_out * kh * kw * c_in
        if isinstance(layer, keras.layers.Dense):
            return int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
        if isinstance(layer, keras.Model):
            return sum(macs(sub) for sub in layer.layers)
        return 0

    encoder_macs = macs(model.encoder)
    projector_macs = macs(model.projector)
    dim = int(model.projector.layers[-1].units)
    per_image = 2 * 3 * 2 * (encoder_macs + projector_macs) + 3 * 2 * dim * dim
    return {
        "encoder_gmac_per_view": encoder_macs / 1e9,
        "projector_gmac_per_view": projector_macs / 1e9,
        "embedding_dim": dim,
        "gflop_per_image": per_image / 1e9,
        "gflop_per_step": per_image * batch_size / 1e9,
    }


# The reference matmul's size. 4096 for every figure a benchmark reports; the tests of the benchmarks' accounting set
# a small one (they check how the numbers add up, not the numbers), which saves ~1 s per product on 2 cores.
MATMUL_SIZE_ENV = "BT_KERAS_BENCHMARK_MATMUL_SIZE"


def matmul_fn(tf, n: int | None = None):
    """Returns a function measuring the fp32 n x n matmul rate (GFLOP/s, one product) with this process's threads
    (n: $BT_KERAS_BENCHMARK_MATMUL_SIZE, else 4096).

    The operands are filled inside the measured function (their fill time, measured separately, is subtracted), so
    that they do not stay resident through the training steps and inflate the peak memory reported for the step.
    """
    n = int(n or os.environ.get(MATMUL_SIZE_ENV) or 4096)
    fill = tf.function(lambda v: tf.reduce_sum(tf.fill([n, n], v)[:1, :1] + tf.fill([n, n], v)[:1, :1]))
    product = tf.function(lambda v: tf.reduce_sum(tf.matmul(tf.fill([n, n], v), tf.fill([n, n], v))[:1, :1]))
    value = tf.constant(1.0 / n)

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn(value).numpy()
        return time.perf_counter() - start

    fill(value).numpy()
    product(value).numpy()
    fill_s = statistics.median(seconds(fill) for _ in range(5))

    def rate() -> float:
        return 2 * n**3 / max(seconds(product) - fill_s, 1e-9) / 1e9

    rate.size = n  # what the reports print beside the rate
    return rate


def cpu_seconds() -> float:
    """User + system CPU seconds this process has used."""
    times = os.times()
    return times.user + times.system


def rusage() -> tuple[int, int]:
    """(minor page faults, peak resident bytes) of this process so far (getrusage)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_maxrss * 1024  # Linux reports ru_maxrss in KiB


def current_rss() -> int:
    """Resident bytes of this process now (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine_info() -> dict:
    """Python, platform, cores (all and usable), CPU model, AVX-512, memory, glibc and the load average at start."""
    from bt_keras.train.host import usable_cores  # loads no TensorFlow

    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        info["usable_cores"] = usable_cores()
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name"))
        flags = next(l for l in cpuinfo.splitlines() if l.startswith("flags")).split()
        info["avx512"] = "avx512f" in flags
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["glibc"] = platform.libc_ver()[1]
    except (OSError, StopIteration, AttributeError, ValueError):
        pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def versions() -> dict:
    """TensorFlow, Keras and NumPy versions, from their installed distributions' metadata (this process stays free of
    TensorFlow); where one is installed under another name (tensorflow-cpu, tf-nightly), read in a child process
    that imports them (~5 CPU-seconds)."""
    from importlib import metadata

    try:
        return {name: metadata.version(name) for name in ("tensorflow", "keras", "numpy")}
    except metadata.PackageNotFoundError:
        pass
    code = "import tensorflow as tf, keras, numpy; print(tf.__version__, keras.__version__, numpy.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout.split()
    return dict(zip(("tensorflow", "keras", "numpy"), out))


def markdown_table(header, rows) -> str:
    """A Markdown table with padded columns, readable as printed and as rendered."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def child_command(module: str, *args: str) -> list[str]:
    """The command running benchmarks.<module> as a module in a child process (run it with cwd=REPO)."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def write_json(path, report: dict, indent: int = 1) -> Path:
    """Writes `report` as JSON to `path` (its folder created), newline-terminated; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent) + "\n")
    return path

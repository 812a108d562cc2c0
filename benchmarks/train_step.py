"""Steady-state Barlow Twins training-step throughput on this machine, against the fp32 matmul rate of the same run.

What is timed: `BarlowTwins.fit` on synthetic float32 view pairs already in memory (one batch, repeated), i.e. the
step a user's `fit` runs -- forward and backward of both views, the global-batch loss, LARS -- and not the input
pipeline (benchmarks.input_pipeline measures that). An "image" is one sample with both of its views.

Each configuration runs in its own child process (allocator settings such as MALLOC_* must be in place before a
process starts; TensorFlow's thread pools are fixed at its first op; --shared-child runs them all in one child
instead, to check the script quickly, not to measure). The child reports:

  images/s           batch / median step time
  step s             median, p10, p90 of the timed steps (wall clock of one `train_function` call, `on_train_batch_begin`
                     to `on_train_batch_end`, the loss read back)
  GFLOP/image        training FLOPs counted from the model: 2 views x 3 (forward + 2 backward) x 2 x MACs of every
                     convolution and dense layer, plus 3 x 2 x D^2 for the cross-correlation matrix
  GFLOP/s            batch x GFLOP/image / median step time
  matmul             fp32 4096 x 4096 matmul rate measured in the SAME child: once right before every timed step, and
                     3 times before and after them (median of all)
  % matmul           median over the timed steps of (the step's GFLOP/s) / (the matmul rate measured just before
                     it): paired measurements cancel most of the drift when other processes share the cores
  CPU s/step         user + system CPU seconds of the process per step (cores busy x step time)
  peak RSS           the child's peak resident memory (getrusage ru_maxrss)
  faults/step        minor page faults per timed step (ru_minflt); large values mean the allocator hands memory
                     back to the system and the step page-faults it in again

Allocators (--allocator, several allowed). TensorFlow's oneDNN build (the x86 default) serves CPU tensors of
256 KiB and more from its own BFC pool (MklCPUAllocator: grows, never returns memory) and smaller ones from malloc.
  default       the process as users start it: that pool, glibc malloc with its defaults
  tuned         default + bt_keras.train.host.tune_malloc() (mallopt: no mmap, no trimming, one arena)
  system        TF_ONEDNN_USE_SYSTEM_ALLOCATOR=true: every tensor from glibc malloc, glibc defaults (large blocks are
                mmap'ed and unmapped each step: the page faults the PyTorch issue describes)
  system-env    system + MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_ MALLOC_TOP_PAD_ in the environment
  system-tuned  system + tune_malloc() at start-up: bt_keras.train.host.configure_host(allocator="system")

LARS (--lars, several allowed): `native` (default) is bt_keras.method.optim.LARS's native CPU kernel (bt_keras.kernels:
two passes over each variable); `tf-ops` forces the TensorFlow-ops update (LARS(native=False)), for comparison.

Strategies (--strategy, several allowed): `default` (one device) and `mirrored:N` (MirroredStrategy over N logical
CPU devices: the same cores, split). Each mirrored configuration also reports
  vs 1 device        its images/s over the same configuration's on one device, in the same run (same global batch),
                     and "paired": the ratio of the two "% matmul" (each step's rate over the matmul rate measured
                     right before it), which cancels most of the drift when other jobs share the cores
  sent/replica       bytes each replica sends per step, measured from the traced step: its collective ops
                     (benchmarks.collectives: every all-reduce / all-gather's input, ring algorithm), by kind, plus
                     the tensors that cross devices (ReductionToOneDevice: to the reduce device and back; passed by
                     reference between CPU devices of one process), the most any replica sends
  loss: gram / C     the same for the loss alone in its two forms (bt_keras.method.loss_forms), traced at the step's
                     batch and embedding width under collective ops (what GPUs and multi-worker training run),
                     beside the cost model's count
  variables/replica  bytes of one replica's copy of the model's and the optimizer's variables (what R replicas
                     hold R times)
--loss-form gram|correlation forces a form of the loss (default auto: the cost rule of bt_keras.method.loss_forms).
--cross-device auto|one_device|collective: how mirrored replicas sum (bt_keras.distribute.mirrored; auto is
one_device on CPUs), several allowed to compare them in one run.

Examples:
  python -m benchmarks.train_step                                   # cifar + imagenet_small, default vs system (~10 min)
  python -m benchmarks.train_step --preset cifar --allocator tuned
  python -m benchmarks.train_step --preset imagenet_small --allocator default --lars native tf-ops
  python -m benchmarks.train_step --preset cifar --sweep-batch 64 128 256 512 --allocator default system-tuned
  python -m benchmarks.train_step --preset cifar --sweep-projector 2048-2048-2048 8192-8192-8192
  python -m benchmarks.train_step --preset imagenet_small --profile /tmp/bt_profile   # adds the top ops
  python -m benchmarks.train_step --backbone resnet50 --image-size 64 --batch-size 16 --projector 4096-4096
  python -m benchmarks.train_step --preset cifar --strategy mirrored:2 --jit --dtype-policy mixed_bfloat16
  python -m benchmarks.train_step --preset cifar imagenet_small --allocator default --strategy default mirrored:2 mirrored:4
  python -m benchmarks.train_step --preset imagenet_small --allocator tuned --strategy default mirrored:2 \
      --cross-device one_device collective
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/train_step.py`: the benchmarks package is not importable that way
    raise SystemExit("Run it from the repository root as a module: python -m benchmarks.train_step [flags]")
from benchmarks import harness

DEFAULT_STEPS = {"cifar": (2, 6), "imagenet_small": (3, 10)}  # (warm-up, timed) steps

ALLOCATOR_ENV_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_",
                      "TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "TF_CPU_ALLOCATOR_USE_BFC", "TF_MKL_ALLOC_MAX_BYTES", "LD_PRELOAD")
ALLOCATORS = ("default", "tuned", "system", "system-env", "system-tuned")


# ----------------------------------------------------------------------------------------------------------------
# Child: builds one configuration, times it, prints one JSON line.
# ----------------------------------------------------------------------------------------------------------------

def top_ops_from_trace(logdir: str, limit: int = 25) -> list[dict]:
    """Aggregates the TensorFlow op events of a profiler trace (xplane.pb) by op type: total ms, count, share.

    Op events are those named "<node name>:<op type>" on the executor threads (tf_Compute*) of the host plane.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    totals: dict[str, list] = {}
    for path in Path(logdir).rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace()
        space.ParseFromString(path.read_bytes())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            names = {k: v.name for k, v in plane.event_metadata.items()}
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                for event in line.events:
                    name = names.get(event.metadata_id, "")
                    if ":" not in name or "::" in name:  # executor bookkeeping (ExecutorState::Process, ...)
                        continue
                    entry = totals.setdefault(name.rsplit(":", 1)[1], [0.0, 0])
                    entry[0] += event.duration_ps / 1e9  # ms
                    entry[1] += 1
    total = sum(v[0] for v in totals.values()) or 1.0
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:limit]
    return [{"op": k, "ms": round(v[0], 2), "count": v[1], "share": round(v[0] / total, 4)} for k, v in rows]


def variable_bytes(model) -> int:
    """Bytes of one copy of the model's and its optimizer's variables (each replica holds one)."""
    import numpy as np

    variables = list(model.variables) + list(model.optimizer.variables)
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def measure_collectives(tf, strategy, model, views, config) -> dict:
    """Bytes each replica sends per step, read from the traced graphs' collective ops (benchmarks.collectives): the
    whole `train_step`, and the loss alone in both forms at the step's shapes beside bt_keras.method.loss_forms'
    count."""
    from benchmarks import collectives
    from bt_keras import distribute
    from bt_keras.method import loss_forms
    from bt_keras.method.losses import barlow_twins_loss

    replicas = strategy.num_replicas_in_sync
    v1, v2 = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(views))))
    step = tf.function(lambda a, b: strategy.run(model.train_step, args=((a, b),)))
    graph = step.get_concrete_function(v1, v2).graph
    step_summary = collectives.summary(collectives.collective_ops(graph))
    transfers = collectives.device_transfers(graph)
    step_summary["by_reference"] = {"bytes_by_replica": transfers, "bytes_sent": max(transfers.values(), default=0)}
    step_summary["bytes_sent"] += step_summary["by_reference"]["bytes_sent"]
    report = {"step": step_summary, "loss": {}}
    # The loss alone under collective ops (what the cost model counts, and what GPUs run).
    strategy = distribute.mirrored(strategy.extended.worker_devices, cross_device_ops="collective")

    batch, dim = config["batch_size"], int(model.projector.layers[-1].units)
    z = tf.zeros([batch, dim])
    z1, z2 = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((z, z)))))

    def loss_step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            objective = barlow_twins_loss(a, b)["loss"] / replicas
        return tape.gradient(objective, [a, b])

    chosen = loss_forms.forced()
    try:
        for form in loss_forms.FORMS:
            loss_forms.set_form(form)
            graph = tf.function(lambda a, b: strategy.run(loss_step, args=(a, b))).get_concrete_function(z1, z2).graph
            ops = collectives.collective_ops(graph)
            report["loss"][form] = {"measured_bytes": collectives.bytes_sent_per_replica(ops),
                                    "model_bytes": loss_forms.costs(batch, dim, replicas)[form].bytes_sent,
                                    "ops": len([op for op in ops if op.replica == 0])}
    finally:
        loss_forms.set_form(chosen)
    report["loss_form_used"] = chosen or loss_forms.choose(batch, dim, replicas)
    return report


def replicas_of(config: dict) -> int:
    strategy_name = config["strategy"]
    return int(strategy_name.split(":")[1]) if strategy_name.startswith("mirrored:") else 1


def run_child(configs: list[dict]) -> None:
    """Sets the process up for `configs` (one, or several with --shared-child: the same allocator and threads, as
    many logical CPU devices as the largest mirrored:N) and measures each in turn, printing one JSON line each."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bt_keras.train import host as host_lib

    first = configs[0]
    host = {"malloc_tuned": host_lib.tune_malloc() if first["allocator"] in ("tuned", "system-tuned") else False}
    replicas = max(replicas_of(config) for config in configs)

    import tensorflow as tf

    if replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    if first["threads"] != "tf-default":
        host.update(host_lib.configure_threads(first["threads"], first["inter_op"]))
    else:
        host.update(intra_op=0, inter_op=0, applied=False)
    import keras

    for index, config in enumerate(configs):
        if index:  # --shared-child: the previous configuration's models and functions go
            keras.backend.clear_session()
        print(json.dumps(measure_config(config, host)), flush=True)


def measure_config(config: dict, host: dict) -> dict:
    """Builds one configuration in this (already set up) process and times it: the child's result for it."""
    replicas = replicas_of(config)

    import keras
    import numpy as np
    import tensorflow as tf

    from bt_keras import BarlowTwins
    from bt_keras.method.optim import LARS, WarmupCosine
    from bt_keras.nets import backbones, heads

    from bt_keras.method import loss_forms

    keras.config.set_dtype_policy(config["dtype_policy"])
    loss_forms.set_form(None if config.get("loss_form", "auto") == "auto" else config["loss_form"])
    from bt_keras import distribute

    strategy = (distribute.mirrored([f"/cpu:{i}" for i in range(replicas)], config.get("cross_device", "auto"))
                if replicas > 1 else tf.distribute.get_strategy())
    size, batch = config["image_size"], config["batch_size"]
    with strategy.scope():
        keras.utils.set_random_seed(0)
        encoder = backbones.get_backbone(config["backbone"], input_shape=(size, size, 3), stem=config["stem"])
        model = BarlowTwins(encoder, heads.projector(config["projector"]))
        # The CIFAR recipe's optimizer: LARS with warm-up + cosine (the schedule's cost is part of the step).
        lars = LARS(WarmupCosine(0.3 * batch / 256, 10, 1000), eta=0.02, weight_decay=1e-4,
                    native=None if config["jit"] else config["lars"] == "native")
        model.compile(optimizer=lars, jit_compile=config["jit"])
    flops = harness.count_flops(model, batch)

    rng = np.random.default_rng(0)
    views = tuple(rng.standard_normal((batch, size, size, 3), dtype=np.float32) for _ in range(2))
    dataset = tf.data.Dataset.from_tensors(views).repeat()

    # Each timed step is preceded by one fp32 matmul measurement, so every step has a matmul rate measured within a
    # second of it: the paired ratios cancel most of the drift when other processes share the cores.
    matmul = harness.matmul_fn(tf)
    steps_log: list[dict] = []
    warmup, steps = config["warmup"], config["steps"]

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch_index, logs=None):
            self.rate = matmul() if batch_index >= warmup else None
            self.cpu = harness.cpu_seconds()
            self.faults = harness.rusage()[0]
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch_index, logs=None):
            float(logs["loss"])  # the step's result is ready
            steps_log.append({"s": time.perf_counter() - self.start, "cpu_s": harness.cpu_seconds() - self.cpu,
                              "faults": harness.rusage()[0] - self.faults, "matmul": self.rate})

    rate_before = statistics.median([matmul() for _ in range(3)])
    model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[Timer()])
    rate_after = statistics.median([matmul() for _ in range(3)])

    timed = steps_log[warmup:]
    times = [t["s"] for t in timed]
    median = statistics.median(times)
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [median] * 9
    paired = [flops["gflop_per_step"] / t["s"] / t["matmul"] for t in timed]
    rates = [t["matmul"] for t in timed] + [rate_before, rate_after]
    result = {
        "config": config,
        "host": host,
        "first_step_s": steps_log[0]["s"],
        "step_s": {"median": median, "p10": quantiles[0], "p90": quantiles[-1], "all": times},
        "cpu_s_per_step": statistics.median(t["cpu_s"] for t in timed),
        "images_per_s": batch / median,
        "page_faults_per_step": statistics.median(t["faults"] for t in timed),
        "peak_rss_gib": harness.rusage()[1] / 2**30,
        "rss_after_gib": harness.current_rss() / 2**30,
        "matmul_size": matmul.size,
        "matmul_gflops": {"before": rate_before, "after": rate_after, "per_step": [t["matmul"] for t in timed],
                          "median": statistics.median(rates)},
        **flops,
    }
    result["achieved_gflops"] = flops["gflop_per_step"] / median
    # The headline ratio: median over steps of (this step's GFLOP/s) / (the matmul rate measured just before it).
    result["fraction_of_matmul"] = statistics.median(paired)
    result["fraction_of_matmul_all"] = paired

    result["variables_gib_per_replica"] = variable_bytes(model) / 2**30
    result["trainable_parameters"] = int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    if replicas > 1:  # after the timed steps: tracing adds nothing to the step's peak memory
        result["collectives"] = measure_collectives(tf, strategy, model, views, config)

    if config.get("profile"):
        logdir = os.path.join(config["profile"], config["name"])
        tf.profiler.experimental.start(logdir)
        model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)
        tf.profiler.experimental.stop()
        result["profile_dir"] = logdir
        result["top_ops"] = top_ops_from_trace(logdir)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Parent: runs the children, prints the table, writes JSON.
# ----------------------------------------------------------------------------------------------------------------

def child_env(allocator: str) -> dict:
    from bt_keras.train.host import ALLOCATOR_ENV

    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose from {ALLOCATORS}")
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV_VARS}
    if allocator.startswith("system"):
        env["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = "true"
    if allocator == "system-env":
        env.update(ALLOCATOR_ENV)
    return env


def run_configs(configs: list[dict], log) -> list[dict]:
    """Runs `configs` in one child process (one configuration, or all of them with --shared-child): their results,
    in order; an error for each when the child fails."""
    cmd = harness.child_command("train_step", "--child", json.dumps(configs))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(configs[0]["allocator"]),
                          cwd=harness.REPO)
    log.write(f"=== {' + '.join(config['name'] for config in configs)}\n{proc.stderr}\n")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or len(lines) != len(configs):
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        return [{"config": config, "error": f"exit {proc.returncode}: {tail}"} for config in configs]
    return [json.loads(line) for line in lines]


def one_device_name(config: dict) -> str:
    """The name of the same configuration on one device (the strategy and cross-device tags removed)."""
    return "/".join(tag for tag in config["name"].split("/")
                    if not tag.startswith("mirrored:") and tag not in ("one_device", "collective"))


def format_table(results: list[dict]) -> str:
    header = ("config", "img/s", "step s med [p10, p90]", "CPU s/step", "GFLOP/img", "GFLOP/s", "matmul",
              "% matmul", "peak RSS GiB", "faults/step")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["config"]["name"], "error", r["error"].splitlines()[-1][:60], "", "", "", "", "", "", ""))
            continue
        s = r["step_s"]
        rows.append((
            r["config"]["name"], f"{r['images_per_s']:.1f}", f"{s['median']:.3f} [{s['p10']:.3f}, {s['p90']:.3f}]",
            f"{r['cpu_s_per_step']:.2f}",
            f"{r['gflop_per_image']:.2f}", f"{r['achieved_gflops']:.0f}", f"{r['matmul_gflops']['median']:.0f}",
            f"{100 * r['fraction_of_matmul']:.0f}%", f"{r['peak_rss_gib']:.2f}", f"{r['page_faults_per_step']:.0f}",
        ))
    return harness.markdown_table(header, rows)


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_scaling_table(results: list[dict]) -> str:
    """Mirrored configurations against the same configuration on one device, from the same run."""
    by_name = {r["config"]["name"]: r for r in results if "error" not in r}
    header = ("config", "img/s", "vs 1 device: img/s, paired", "% matmul (1 device)", "peak RSS GiB (1 device)",
              "variables/replica GiB", "sent/replica/step MiB", "loss form", "loss sent: gram / C (model)")
    rows = []
    for r in results:
        if "error" in r or "collectives" not in r:
            continue
        base = by_name.get(one_device_name(r["config"]))
        c = r["collectives"]
        loss = c["loss"]
        rows.append((
            r["config"]["name"], f"{r['images_per_s']:.1f}",
            f"{r['images_per_s'] / base['images_per_s']:.2f}, "
            f"{r['fraction_of_matmul'] / base['fraction_of_matmul']:.2f}" if base else "n/a",
            f"{100 * r['fraction_of_matmul']:.0f}% ({100 * base['fraction_of_matmul']:.0f}%)" if base else "",
            f"{r['peak_rss_gib']:.2f} ({base['peak_rss_gib']:.2f})" if base else f"{r['peak_rss_gib']:.2f}",
            f"{r['variables_gib_per_replica']:.2f}", f"{c['step']['bytes_sent'] / 2**20:.1f}", c["loss_form_used"],
            f"{_size(loss['gram']['measured_bytes'])} / {_size(loss['correlation']['measured_bytes'])} "
            f"({_size(loss['gram']['model_bytes'])} / {_size(loss['correlation']['model_bytes'])})",
        ))
    return harness.markdown_table(header, rows) if rows else ""


def build_configs(args) -> list[dict]:
    configs = []
    presets = args.preset or (["custom"] if args.backbone else ["cifar", "imagenet_small"])
    for preset in presets:
        base = dict(harness.PRESETS.get(preset, harness.PRESETS["cifar"]))
        for key in ("backbone", "stem", "image_size", "batch_size", "projector"):
            if getattr(args, key) is not None:
                base[key] = getattr(args, key)
        warmup, steps = DEFAULT_STEPS.get(preset, (2, 6))
        variants = [{}]
        if args.sweep_batch:
            variants = [dict(batch_size=b) for b in args.sweep_batch]
        if args.sweep_projector:
            variants = [dict(v, projector=p) for v in variants for p in args.sweep_projector]
        for variant in variants:
            combinations = [(a, k, st, lf, cd) for a in args.allocator for k in args.lars for st in args.strategy
                            for lf in args.loss_form
                            for cd in (args.cross_device if st != "default" else ["auto"])]
            for allocator, lars, strategy, loss_form, cross_device in combinations:
                config = dict(base, **variant, allocator=allocator, lars=lars, strategy=strategy, jit=args.jit,
                              cross_device=cross_device,
                              dtype_policy=args.dtype_policy, threads=args.threads, inter_op=args.inter_op,
                              warmup=args.warmup if args.warmup is not None else warmup,
                              steps=args.steps if args.steps is not None else steps, profile=args.profile,
                              loss_form=loss_form)
                tags = [preset]
                tags += [f"b{config['batch_size']}"] if (args.sweep_batch or args.batch_size) else []
                tags += [f"p{config['projector'].split('-')[-1]}"] if (args.sweep_projector or args.projector) else []
                tags += [allocator]
                tags += [lars] if lars != "native" else []
                tags += [f"loss-{loss_form}"] if loss_form != "auto" else []
                tags += [strategy] if strategy != "default" else []
                tags += [cross_device] if cross_device != "auto" else []
                tags += ["xla"] if args.jit else []
                tags += [args.dtype_policy] if args.dtype_policy != "float32" else []
                if args.threads == "tf-default":
                    tags += ["tf-threads"]
                elif args.threads is not None or args.inter_op is not None:
                    tags += [f"t{args.threads or 'cores'}i{args.inter_op}"]
                config["name"] = "/".join(tags)
                configs.append(config)
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", nargs="*", choices=sorted(harness.PRESETS) + ["custom"],
                        help="default: cifar and imagenet_small (or custom when --backbone is given)")
    parser.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "small_cnn"],
                        help="small_cnn: three conv layers, a quick check of the script (the stem does not apply)")
    parser.add_argument("--stem", choices=["imagenet", "cifar"])
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch")
    parser.add_argument("--projector", help='e.g. "8192-8192-8192"')
    parser.add_argument("--strategy", nargs="+", default=["default"],
                        help='"default" and/or "mirrored:N" (N logical CPU devices), e.g. default mirrored:2 mirrored:4')
    parser.add_argument("--loss-form", nargs="+", default=["auto"], choices=["auto", "gram", "correlation"],
                        help="the loss's form (bt_keras.method.loss_forms): auto (its cost rule) or forced")
    parser.add_argument("--cross-device", nargs="+", default=["auto"], choices=["auto", "one_device", "collective"],
                        help="how mirrored replicas sum (bt_keras.distribute.mirrored): auto is one_device on CPUs")
    parser.add_argument("--allocator", nargs="+", default=None, choices=ALLOCATORS,
                        help="default: default system (see above)")
    parser.add_argument("--lars", nargs="+", default=["native"], choices=["native", "tf-ops"],
                        help="LARS update: the native CPU kernel (bt_keras.kernels, default) or TensorFlow ops")
    parser.add_argument("--threads", type=lambda v: v if v == "tf-default" else int(v), default=None,
                        help="intra-op threads (default: usable cores); 'tf-default' leaves TensorFlow's defaults")
    parser.add_argument("--inter-op", type=int, default=None,
                        help="inter-op threads (default: TensorFlow's, the number of cores)")
    parser.add_argument("--jit", action="store_true", help="compile the step with XLA (jit_compile=True)")
    parser.add_argument("--dtype-policy", default="float32", help="float32, mixed_bfloat16 or mixed_float16")
    parser.add_argument("--sweep-batch", type=int, nargs="*")
    parser.add_argument("--sweep-projector", nargs="*")
    parser.add_argument("--warmup", type=int, help="untimed steps (default per preset: cifar 2, imagenet_small 3)")
    parser.add_argument("--steps", type=int, help="timed steps (default per preset: cifar 6, imagenet_small 10)")
    parser.add_argument("--profile", help="directory: trace 2 extra steps per configuration and report the top ops")
    parser.add_argument("--shared-child", action="store_true",
                        help="run every configuration in ONE child process, one after the other: a quick check of "
                             "the script and its tables (one --allocator; the child has as many logical CPU devices "
                             "as the largest mirrored:N, and peak RSS, page faults and thread pools are shared, so "
                             "they are not each configuration's own)")
    parser.add_argument("--output", default=str(harness.RESULTS / "train_step.json"))
    args = parser.parse_args()

    if args.child:
        configs = json.loads(args.child)
        run_child(configs if isinstance(configs, list) else [configs])
        return

    for strategy in args.strategy:
        if strategy != "default" and not (strategy.startswith("mirrored:") and strategy.split(":")[1].isdigit()):
            raise SystemExit(f"--strategy {strategy!r}: use default or mirrored:N (N logical CPU devices)")
    args.allocator = args.allocator or ["default", "system"]
    if args.shared_child and len(args.allocator) > 1:
        raise SystemExit("--shared-child: give one --allocator (its settings are fixed when a process starts)")
    configs = build_configs(args)
    info = {"machine": harness.machine_info(), "versions": harness.versions(), "command": " ".join(sys.argv)}
    print(f"{info['machine'].get('cpu', '?')}, {info['machine'].get('usable_cores')} cores, "
          f"TF {info['versions'].get('tensorflow')}, Keras {info['versions'].get('keras')}; "
          f"{len(configs)} configuration(s)", flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with open(output.with_suffix(".log"), "w") as log:
        for group in ([configs] if args.shared_child else [[config] for config in configs]):
            started = time.perf_counter()
            for config, result in zip(group, run_configs(group, log)):
                results.append(result)
                if "error" in result:
                    print(f"  {config['name']}: ERROR {result['error']}", flush=True)
                else:
                    print(f"  {config['name']}: {result['images_per_s']:.1f} img/s, "
                          f"{100 * result['fraction_of_matmul']:.0f}% of matmul, "
                          f"{result['peak_rss_gib']:.2f} GiB, {result['page_faults_per_step']:.0f} faults/step "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                for op in result.get("top_ops", [])[:15]:
                    print(f"      {op['share']:6.1%} {op['ms']:9.1f} ms  {op['count']:6d}x  {op['op']}")
    print()
    print(format_table(results))
    scaling = format_scaling_table(results)
    if scaling:
        print("\nReplicas against one device (same run, same global batch):\n")
        print(scaling)
    harness.write_json(output, {**info, "results": results})
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()

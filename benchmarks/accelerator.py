"""Barlow Twins on one accelerator host: step speed, memory and numerics in float32, mixed precision and mixed + XLA,
beside a plain supervised step of the same backbone, and whether the host's input pipeline keeps up.

    python -m benchmarks.accelerator                 # GPU or TPU host: cifar + imagenet presets (aimed at <= 8 min)
    python -m benchmarks.accelerator --smoke         # the same code on a CPU at tiny sizes (about a minute on 2 cores)

Presets (synthetic data already on the device; the input pipeline is measured separately):
  cifar      ResNet-18, CIFAR stem, 32 px, global batch 512, projector 2048-2048-2048 (experiments/cifar10_resnet18.py)
  imagenet   ResNet-50, 224 px, projector 8192-8192-8192 (experiments/imagenet_resnet50.py), the largest batch per
             device of 256 / 128 / 64 that fits: tried largest first, an out-of-memory error (ResourceExhaustedError,
             or XLA's RESOURCE_EXHAUSTED) steps down; the batch that fitted and the OOMs before it are recorded per mode
  --smoke    both at width 1/4, one block per stage, 32 px, batch 16, projector 256-256, 1 warm-up + 2 timed steps

Modes:
  float32     the trainer's default
  mixed       mixed_float16 on GPUs (with bt_keras's dynamic loss scaling, bt_keras.method.precision), mixed_bfloat16 on TPUs
              and CPUs (float16 is emulated and very slow on CPUs; --mixed-policy overrides)
  mixed_xla   the same, each replica's step compiled with XLA (bt_keras.train.step, what --xla does)

The Barlow Twins step of each mode: the model and LARS built by the trainer's own builder
(`bt_keras.assembly.builders.build_training_model`: the recipe under `config.precision`, compiled, optimizer built on
`model.pretrain_variables`) and the replica step as the trainer runs it
(`bt_keras.train.step.replica_step(model, strategy, jit_compile, element_spec)`, which XLA-compiles it first on one replica,
called as `strategy.run(replica_step, args=(batch,))` inside a `tf.function`). Changed from the recipes: the online
probe is off (it needs labelled batches and is not what Barlow Twins costs), there is no learning-rate warm-up (so the
agreement step below moves the weights; the speed does not depend on the rate), and LARS's rates are scaled for the
preset's largest candidate batch whatever batch fits (one optimizer for every mode). Beside it, in the same child
process and mode, a plain supervised step of the same backbone: plain (unsynchronised) BatchNorm, a linear head to
1000 (imagenet) or 10 (cifar) classes, softmax cross-entropy, SGD with momentum 0.9, one view, the same batch size
(Keras's own `train_step` through the same `bt_keras.train.step.replica_step` / `strategy.run` path and loss scaling).

Timing: `--warmup` untimed steps (the first one traces and, for XLA, compiles: `first_step_s`; under loss scaling the
warm-up goes on until a step is not skipped, `settle_steps`), then `--steps` steps back to back and ONE
synchronisation at the end (`tf.test.experimental.sync_devices()` and the last loss read back): the throughput a
training loop gets between logging steps, without a host round trip per step.

Reported per preset and mode:
  pairs/s, view images/s     Barlow Twins view pairs (2 images each) per second; supervised images/s (one view)
  FLOP rate                  FLOPs counted from the model as benchmarks.train_step counts them (harness.count_flops):
                             per pair 2 views x 3 (forward + 2 backward) x 2 x MACs of every Conv2D and Dense layer
                             + 3 x 2 x D^2 for C; supervised per image 1 view x 3 x 2 x (MACs + the head's MACs)
  bt_over_supervised_flops   BT FLOP/s / supervised FLOP/s: how much of the plain step's efficiency survives what
                             Barlow Twins adds (two views, projector, loss, LARS, synchronised BatchNorm)
  over_float32               BT pairs/s over the float32 mode's (same preset); supervised_over_float32 the same
  peak memory                GPU/TPU: `tf.config.experimental.get_memory_info(device)["peak"]`, reset before each
                             model is built (weights, optimizer state, activations, XLA buffers); CPU: the process's
                             peak RSS, reset through /proc/self/clear_refs (it includes what allocators kept from
                             earlier models, so it is an upper bound there)
  loss scale, skipped steps  under mixed_float16: the dynamic scale and the steps whose update was dropped (in the
                             timed steps: should be 0)

Agreement (per preset; `--agreement-batch` pairs, default cifar 512 and imagenet 64 per device, smoke 16): the same
batch and the same initial weights, ONE training step in float64 on the same device (the reference: float64 policy,
same builders and LARS; not possible on TPUs, recorded as an error there) against each mode's own model and timed step
function, reset to those weights and a fresh optimizer after its timing (under loss scaling it keeps the settled
scale: a fresh 2^15 skips the first float16 steps; the XLA mode only when the agreement batch is the timed one, as
another batch means a second XLA compile, unless --agreement-xla): the loss's relative difference, and the updated
trainable weights' max |difference| relative to the reference step's largest update (and to the largest weight);
BatchNorm moving statistics too. At small batches one ReLU input within round-off of 0 can flip and move a gradient
by a few percent in float32 (the smoke run's cifar batch has one: 1.5e-2 of the update, against 4e-6 without it).

Input pipeline (per preset, on the host's CPUs): view pairs/s of `bt_keras.data.pair_batches` with synthetic
in-memory images of the preset's size (no dataset exists on a bare accelerator host): cifar from uint8 arrays (CIFAR
recipe), imagenet from synthetic 300-500 px JPEGs (ImageNet recipe, as benchmarks.input_pipeline), in both
`augment_on` modes ("host": tf.data does everything; "accelerator": the host's share, uint8 crops + per-image
draws, whose colour steps then run inside the step on the device and are NOT in the timed step above), beside the
pairs/s the fastest mode's step consumes (pipeline / step >= 1: the host keeps the device fed).

Each preset runs in its own child process (a clean TensorFlow; OOM retries inside it), one after the other (--smoke:
both at once, its numbers being no measurement, and XLA's CPU backend at its cheaper LLVM settings, the same HLO);
the parent streams their progress lines, prints the tables and writes JSON (default
benchmarks/results/accelerator.json, accelerator_smoke.json with --smoke; `"smoke": true` and the device say what
the numbers are; the children's logs beside it). Goals (imagenet): BT FLOP/s / supervised FLOP/s >= 0.8 in mixed +
XLA, and BT pairs/s mixed + XLA / float32 >= 2; `met` is null in a smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/accelerator.py`: the benchmarks package is not importable that way
    raise SystemExit("Run it from the repository root as a module: python -m benchmarks.accelerator [flags]")
from benchmarks import harness  # FLOP count, tables, process counters (no TensorFlow at import)

MODES = ("float32", "mixed", "mixed_xla")
PRESETS = {
    "cifar": dict(recipe="cifar10_resnet18", backbone="resnet18", stem="cifar", image_size=32, batches=(512,),
                  batch_is_global=True, projector="2048-2048-2048", classes=10, width_multiplier=1.0, blocks=None,
                  pipeline="uint8", agreement_batch=512),
    "imagenet": dict(recipe="imagenet_resnet50", backbone="resnet50", stem="imagenet", image_size=224,
                     batches=(256, 128, 64), batch_is_global=False, projector="8192-8192-8192", classes=1000,
                     width_multiplier=1.0, blocks=None, pipeline="jpeg", agreement_batch=64),
}
# --smoke: the same code at sizes a 2-core CPU runs in about a minute. Width 1/4, not 1/8: TensorFlow 2.21's oneDNN
# convolutions crash in the backward pass of 8-channel ResNet stages (README, "Known limits"). 32 px for both: XLA's
# compile time does not depend on the size, the steps' time does.
SMOKE = {
    "cifar": dict(image_size=32, batches=(16,), projector="256-256", width_multiplier=0.25, blocks=(1, 1, 1, 1),
                  agreement_batch=16),
    "imagenet": dict(image_size=32, batches=(16,), projector="256-256", width_multiplier=0.25, blocks=(1, 1, 1, 1),
                     agreement_batch=16),
}
# --smoke: XLA's CPU backend spends most of a smoke run in LLVM; its cheaper settings (same HLO, same code path)
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DEFAULTS = dict(warmup=3, steps=10, pipeline_warmup=2, pipeline_batches=5, pipeline_reps=3,
                pipeline_images=64)
SMOKE_DEFAULTS = dict(warmup=1, steps=2, pipeline_warmup=1, pipeline_batches=5, pipeline_reps=1,
                      pipeline_images=32)
GOALS = (  # (preset, mode, metric, target, description)
    ("imagenet", "mixed_xla", "bt_over_supervised_flops", 0.8,
     "imagenet mixed+XLA: Barlow Twins FLOP/s / supervised FLOP/s"),
    ("imagenet", "mixed_xla", "over_float32", 2.0, "imagenet: Barlow Twins pairs/s, mixed+XLA / float32"),
)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (no TensorFlow): the batch fallback, FLOP rates, ratios and goals. Tested in-process.
# ----------------------------------------------------------------------------------------------------------------

class NoBatchFits(RuntimeError):
    """Every candidate batch ran out of device memory."""


def is_oom(error: BaseException) -> bool:
    """Whether `error` is the device running out of memory (TensorFlow's ResourceExhaustedError, or XLA's
    RESOURCE_EXHAUSTED / out-of-memory reported through another error type)."""
    try:
        import tensorflow as tf

        if isinstance(error, tf.errors.ResourceExhaustedError):
            return True
    except ImportError:
        pass
    text = str(error)
    return any(marker in text for marker in ("RESOURCE_EXHAUSTED", "ResourceExhausted", "Out of memory",
                                             "out of memory", "OOM when allocating"))


def first_fitting(candidates, attempt, oom=is_oom, on_oom=None):
    """Runs `attempt(batch)` for each candidate batch, largest first, until one does not run out of memory.

    Returns (batch, attempt's result, [{"batch", "error"} for every candidate that ran out of memory]). Errors that
    are not out-of-memory propagate; NoBatchFits when every candidate ran out.
    """
    failures = []
    for batch in sorted(candidates, reverse=True):
        try:
            return batch, attempt(batch), failures
        except Exception as error:  # noqa: BLE001 (only OOMs are caught; the rest is re-raised)
            if not oom(error):
                raise
            failures.append({"batch": batch, "error": " ".join(str(error).split())[:200]})
            if on_oom is not None:
                on_oom(batch, error)
        gc.collect()
    raise NoBatchFits(f"no batch of {sorted(candidates, reverse=True)} fits in device memory: {failures}")


def supervised_flops(encoder_macs: float, head_macs: float) -> float:
    """Training FLOPs per image of the supervised step: 1 view x 3 (forward + 2 backward) x 2 x MACs."""
    return 3 * 2 * (encoder_macs + head_macs)


def summarize(preset_result: dict) -> dict:
    """Adds the ratios to each mode of a preset's result (in place) and returns it: bt_over_supervised_flops,
    bt_pairs_over_supervised_images, over_float32 (BT pairs/s) and supervised_over_float32."""
    modes = preset_result.get("modes", {})
    base = modes.get("float32", {})
    for name, mode in modes.items():
        if "error" in mode:
            continue
        bt, sup = mode["barlow_twins"], mode["supervised"]
        mode["bt_over_supervised_flops"] = bt["flop_per_s"] / sup["flop_per_s"]
        mode["bt_pairs_over_supervised_images"] = bt["pairs_per_s"] / sup["images_per_s"]
        if "barlow_twins" in base:
            mode["over_float32"] = bt["pairs_per_s"] / base["barlow_twins"]["pairs_per_s"]
            mode["supervised_over_float32"] = sup["images_per_s"] / base["supervised"]["images_per_s"]
    return preset_result


def goals(presets: dict, smoke: bool) -> list[dict]:
    """The goal entries: measured value, target, met (None in a smoke run or when not measured)."""
    entries = []
    for preset, mode, metric, target, description in GOALS:
        measured = presets.get(preset, {}).get("modes", {}).get(mode, {}).get(metric)
        entries.append({"name": description, "preset": preset, "mode": mode, "metric": metric, "measured": measured,
                        "target": target, "met": None if (smoke or measured is None) else bool(measured >= target)})
    return entries


# ----------------------------------------------------------------------------------------------------------------
# Child: one preset, every mode, the agreement and the input pipeline; prints progress lines ("# ...") and one
# JSON line.
# ----------------------------------------------------------------------------------------------------------------

def progress(message: str) -> None:
    print(f"# {message}", flush=True)


def load_recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", harness.REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def nominal_batch(preset: dict, replicas: int) -> int:
    """The global batch the recipe's learning rates are scaled for (LARS's `batch / 256`): the preset's largest
    candidate, whatever batch then fits, so that every mode and the agreement step share one optimizer."""
    largest = max(preset["batches"])
    return largest if preset["batch_is_global"] else largest * replicas


def preset_config(preset: dict, policy: str, jit: bool, replicas: int = 1):
    """The recipe's config with the preset's sizes, the mode's precision and XLA, and the online probe off.

    `batch_size` is the preset's nominal global batch (it only scales LARS's learning rates; the batch actually run
    is the one that fits). No learning-rate warm-up: the first step runs at the peak rate, so that the agreement
    step moves the weights (the step's speed does not depend on the rate)."""
    config = load_recipe(preset["recipe"])
    config.batch_size = nominal_batch(preset, replicas)
    config.image_size = preset["image_size"]
    config.projector = preset["projector"]
    config.width_multiplier = preset["width_multiplier"]
    if preset.get("blocks"):
        config.blocks = tuple(preset["blocks"])
    config.online_probe.enabled = False
    config.precision = policy
    config.jit_compile = jit
    config.optimizer.warmup_epochs = 0
    return config


STEPS_PER_EPOCH = 100  # the schedule's length only (the speed does not depend on it)


def build_barlow_twins(config, strategy):
    """As the trainer builds it (`builders.build_training_model`): model and LARS from the recipe under
    `config.precision` (float64 for the agreement step's reference), compiled, optimizer built."""
    import keras

    from bt_keras.assembly import builders

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        return builders.build_training_model(config, builders.RunData(None, None, STEPS_PER_EPOCH))


def build_supervised(config, strategy, policy: str, classes: int):
    """The same backbone with plain BatchNorm, a linear head, softmax cross-entropy and SGD with momentum.
    Returns (model, encoder, head)."""
    import keras

    from bt_keras.method import precision
    from bt_keras.nets import backbones

    keras.utils.set_random_seed(config.seed)
    with strategy.scope(), precision.policy_scope(policy):
        encoder = backbones.get_backbone(
            config.backbone, input_shape=(config.image_size, config.image_size, 3), stem=config.stem,
            width_multiplier=config.width_multiplier, blocks=tuple(config.blocks) if config.blocks else None,
            zero_init_residual=bool(config.zero_init_residual), synchronized_bn=False)
        head = keras.Sequential([keras.layers.Dense(classes, name="logits")], name="head")
        inputs = keras.Input((config.image_size, config.image_size, 3))
        model = keras.Model(inputs, head(encoder(inputs)), name="supervised")
        optimizer = precision.wrap_optimizer(keras.optimizers.SGD(0.1, momentum=0.9), policy)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=bool(config.jit_compile))
        model.optimizer.build(model.trainable_variables)
    return model, encoder, head


def make_step(model, strategy, jit: bool, batch):
    """The trainer's step (`Trainer._make_step_fn`) on a batch already on the device: returns (step, info), where
    `step(batch)` runs one training step and returns replica 0's loss metric."""
    import tensorflow as tf

    from bt_keras.train import step as step_lib

    spec = tf.nest.map_structure(tf.TensorSpec.from_tensor, batch) if strategy.num_replicas_in_sync == 1 else None
    replica_step = step_lib.replica_step(model, strategy, jit, spec)
    reason = None
    if jit and not step_lib.is_compiled(replica_step):
        reason = step_lib.xla_obstacle(strategy) or ("TPUStrategy compiles every step"
                                                     if isinstance(strategy, tf.distribute.TPUStrategy)
                                                     else "XLA cannot compile it (see the log)")

    @tf.function
    def step(batch):
        outputs = strategy.run(replica_step, args=(batch,))
        return strategy.experimental_local_results(outputs["loss"])[0]

    compiled = step_lib.is_compiled(replica_step) or (jit and isinstance(strategy, tf.distribute.TPUStrategy))
    return step, {"xla_requested": jit, "xla_compiled": bool(compiled), "xla_note": reason}


class Memory:
    """Peak memory of the device since `reset()`: the allocator's peak on GPU/TPU, the process's peak RSS on CPU."""

    def __init__(self, device: str | None):
        self.device = device  # "GPU:0", "TPU:0" or None (CPU)
        self.kind = "device_allocator_peak" if device else "process_peak_rss"

    def reset(self) -> int:
        """Resets the peak to what is in use now, and returns that (bytes)."""
        import tensorflow as tf

        gc.collect()
        if self.device:
            tf.config.experimental.reset_memory_stats(self.device)
            return int(tf.config.experimental.get_memory_info(self.device)["current"])
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self._status("VmRSS:") or 0

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def peak(self) -> int:
        import tensorflow as tf

        if self.device:
            return int(tf.config.experimental.get_memory_info(self.device)["peak"])
        peak = self._status("VmHWM:")
        if peak is not None:
            return peak
        return harness.rusage()[1]


def sync() -> None:
    import tensorflow as tf

    tf.test.experimental.sync_devices()


MAX_SETTLE_STEPS = 40  # extra warm-up steps allowed for dynamic loss scaling to stop skipping


def time_step(step, batch, warmup: int, steps: int, skipped=None) -> dict:
    """`warmup` untimed steps (the first traces and compiles), then `steps` back to back and one sync at the end.

    `skipped`: a function returning the optimizer's count of skipped steps (dynamic loss scaling), or None. With it,
    the warm-up goes on (up to MAX_SETTLE_STEPS more) until a step is not skipped: a fresh loss scale (2^15) makes
    the first steps' scaled gradients overflow in float16, and a skipped step drops the update (it is cheaper), so
    timing those would overstate the speed. How many were needed is reported (`settle_steps`).
    """
    count = skipped or (lambda: 0.0)
    before = count()
    start = time.perf_counter()
    loss = step(batch)
    first_loss = float(loss)
    first_s = time.perf_counter() - start
    done, last_skipped = 1, count() > before
    while done < warmup or (last_skipped and done < warmup + MAX_SETTLE_STEPS):
        before = count()
        loss = step(batch)
        done += 1
        last_skipped = count() > before if skipped else False
    float(loss)
    skipped_before = count()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(batch)
    sync()
    elapsed = time.perf_counter() - start
    last = float(loss)  # Keras's running mean of the loss metric
    return {"first_step_s": first_s, "timed_s": elapsed, "step_s": elapsed / steps, "warmup_steps": done,
            "settle_steps": max(done - warmup, 0), "still_skipping_after_warmup": bool(last_skipped),
            "skipped_steps_timed": count() - skipped_before if skipped else None,
            "timed_steps": steps, "first_loss": first_loss, "finite": math.isfinite(first_loss) and math.isfinite(last)}


def skipped_counter(model):
    """A function reading the model's count of skipped steps under bt_keras's loss scaling, else None."""
    from bt_keras.method import precision

    if isinstance(model.optimizer, precision.LossScaleOptimizer):
        return lambda: float(model.optimizer.skipped_steps.numpy())
    return None


def synthetic_batch(strategy, per_replica: int, size: int, kind: str, classes: int = 10, seed: int = 0):
    """A batch on the device(s): two float32 views (Barlow Twins) or images + int labels (supervised)."""
    import tensorflow as tf

    def make(context):
        shape = [per_replica, size, size, 3]
        base = tf.random.stateless_normal(shape, seed=[seed, context.replica_id_in_sync_group])
        if kind == "supervised":
            labels = tf.random.stateless_uniform([per_replica], seed=[seed + 1, context.replica_id_in_sync_group],
                                                 maxval=classes, dtype=tf.int32)
            return base, labels
        noise = tf.random.stateless_normal(shape, seed=[seed + 2, context.replica_id_in_sync_group])
        return base, base + 0.3 * noise

    return strategy.experimental_distribute_values_from_function(make)


def optimizer_state(model) -> dict:
    from bt_keras.method import precision

    logs = precision.optimizer_logs(model.optimizer)
    return {name: float(value) for name, value in logs.items()}


class _Parts:
    """What harness.count_flops reads of a model (.encoder, .projector), for the supervised network."""

    def __init__(self, encoder, head):
        self.encoder, self.projector = encoder, head


def measure_model(kind: str, config, strategy, policy: str, jit: bool, global_batch: int, classes: int,
                  memory: Memory, warmup: int, steps: int, agreement=None) -> dict:
    """Builds one model (Barlow Twins or supervised) under the mode, times its step, measures its peak memory, runs
    the agreement step on it (Barlow Twins, when `agreement` is given), and frees it."""
    import keras

    per_replica = global_batch // strategy.num_replicas_in_sync
    in_use_before = memory.reset()
    started = time.perf_counter()
    if kind == "barlow_twins":
        model = build_barlow_twins(config, strategy)
        flops = harness.count_flops(model, global_batch)
        per_item = flops["gflop_per_image"] * 1e9  # per view pair
    else:
        model, encoder, head = build_supervised(config, strategy, policy, classes)
        counted = harness.count_flops(_Parts(encoder, head), global_batch)
        del encoder, head
        per_item = supervised_flops(counted["encoder_gmac_per_view"] * 1e9, counted["projector_gmac_per_view"] * 1e9)
        flops = {"encoder_gmac_per_view": counted["encoder_gmac_per_view"],
                 "head_gmac": counted["projector_gmac_per_view"], "gflop_per_image": per_item / 1e9}
    build_s = time.perf_counter() - started
    fresh_optimizer = [v.numpy() for v in model.optimizer.variables] if agreement else None
    batch = synthetic_batch(strategy, per_replica, config.image_size, kind, classes)
    started = time.perf_counter()
    step, xla = make_step(model, strategy, jit, batch)
    prepare_s = time.perf_counter() - started  # with XLA: the step lowered to HLO once (step.check_compiles)
    timing = time_step(step, batch, warmup, steps, skipped_counter(model))
    after = optimizer_state(model)
    result = {**timing, **xla, "build_s": build_s, "prepare_s": prepare_s, "global_batch": global_batch,
              "per_replica_batch": per_replica, "flops": flops, "peak_memory_bytes": memory.peak(),
              "memory_in_use_before_bytes": in_use_before, "memory_kind": memory.kind, "policy": policy,
              "flop_per_s": per_item * global_batch / timing["step_s"]}
    if kind == "barlow_twins":
        result["pairs_per_s"] = global_batch / timing["step_s"]
        result["view_images_per_s"] = 2 * result["pairs_per_s"]
    else:
        result["images_per_s"] = global_batch / timing["step_s"]
    if after:
        result["loss_scale"] = after.get("loss_scale")
        result["skipped_steps_total"] = after.get("skipped_steps")
    if agreement is not None:  # after the memory peak was read
        if jit and agreement.batch_size != global_batch and not agreement.xla_any_batch:
            result["agreement"] = {"skipped": f"XLA would compile the step again for batch {agreement.batch_size} "
                                              f"(timed at {global_batch}): --agreement-xla runs it"}
        else:
            try:
                result["agreement"] = agreement.compare(model, step, strategy, fresh_optimizer, policy,
                                                        xla["xla_compiled"])
            except Exception as error:  # noqa: BLE001 (an OOM here must not shrink the timed batch)
                result["agreement"] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
    del step, model, batch, fresh_optimizer
    gc.collect()
    keras.backend.clear_session()
    return result


def run_mode(preset: dict, mode: str, strategy, mixed_policy: str, memory: Memory, args: dict,
             agreement=None) -> dict:
    policy = "float32" if mode == "float32" else mixed_policy
    jit = mode.endswith("_xla")
    replicas = strategy.num_replicas_in_sync
    config = preset_config(preset, policy, jit, replicas)

    def attempt(batch: int) -> dict:
        global_batch = batch if preset["batch_is_global"] else batch * replicas
        out = {}
        for kind in ("supervised", "barlow_twins"):  # the smaller first: its peak RSS is not the larger's (CPU)
            progress(f"{preset['name']} {mode}: {kind}, batch {global_batch} ({global_batch // replicas} per "
                     "replica)")
            out[kind] = measure_model(kind, config, strategy, policy, jit, global_batch, preset["classes"], memory,
                                      args["warmup"], args["steps"],
                                      agreement=agreement if kind == "barlow_twins" else None)
            r = out[kind]
            rate = (f"{r['pairs_per_s']:.1f} pairs/s" if kind == "barlow_twins" else f"{r['images_per_s']:.1f} img/s")
            progress(f"{preset['name']} {mode}: {kind} {rate}, {r['flop_per_s'] / 1e12:.3f} TFLOP/s, peak "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} GiB, first step {r['first_step_s']:.1f} s")
        return out

    def on_oom(batch, error):
        progress(f"{preset['name']} {mode}: batch {batch} does not fit (out of memory), trying the next")
        import keras

        keras.backend.clear_session()

    batch, measured, failures = first_fitting(preset["batches"], attempt, on_oom=on_oom)
    agreed = measured["barlow_twins"].pop("agreement", None)
    return {**measured, "policy": policy, "xla": jit, "batch_candidates": list(preset["batches"]),
            "batch_fitted": batch, "batch_out_of_memory": failures, **({"agreement": agreed} if agreed else {})}


class Agreement:
    """One training step from the same weights and batch: the float64 reference, run once on one device, and each
    mode's own Barlow Twins model and step (`compare`), differences relative to the reference."""

    def __init__(self, preset: dict, batch_size: int, xla_any_batch: bool = False):
        import keras
        import numpy as np
        import tensorflow as tf

        progress(f"{preset['name']} agreement: the float64 reference step, batch {batch_size}")
        rng = np.random.default_rng(1)
        shape = (batch_size, preset["image_size"], preset["image_size"], 3)
        images = rng.standard_normal(shape).astype(np.float32)
        self.views = (images, (images + 0.3 * rng.standard_normal(shape)).astype(np.float32))
        self.batch_size = batch_size
        self.xla_any_batch = xla_any_batch  # also compare XLA steps timed at another batch (a second compile)
        strategy = tf.distribute.get_strategy()  # one device: the default one (the first GPU if any)
        model = build_barlow_twins(preset_config(preset, "float64", False), strategy)
        # The initial weights: float64's draws rounded to float32, so every precision starts from the same values.
        self.initial = [w.astype(np.float32) for w in model.get_weights()]
        model.set_weights([w.astype(np.float64) for w in self.initial])
        batch = tuple(tf.constant(v, tf.float64) for v in self.views)
        step, _ = make_step(model, strategy, False, batch)
        self.reference_metric_loss = float(step(batch))
        self.reference = [(v.path, bool(v.trainable), v.numpy()) for v in model.weights]
        model.set_weights([w.astype(np.float64) for w in self.initial])
        self.reference_loss = float(model.compute_loss_terms(*batch, training=True)["loss"])  # float64, exact
        trainable = [(w, w0) for (_, t, w), w0 in zip(self.reference, self.initial) if t]
        self.largest_update = max(float(np.max(np.abs(w - w0))) for w, w0 in trainable)
        self.largest_weight = max(float(np.max(np.abs(w))) for w, _ in trainable)
        del step, model
        gc.collect()
        keras.backend.clear_session()

    def _batch(self, strategy):
        import tensorflow as tf

        replicas = strategy.num_replicas_in_sync
        if replicas == 1:
            return tuple(tf.constant(v) for v in self.views)
        per = self.batch_size // replicas
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tuple(tf.constant(v[ctx.replica_id_in_sync_group * per:(ctx.replica_id_in_sync_group + 1)
                                            * per]) for v in self.views))

    def compare(self, model, step, strategy, fresh_optimizer, policy: str, xla_compiled: bool) -> dict:
        """Resets `model` to the initial weights and a fresh optimizer, runs `step` once on the agreement batch
        (the same function the mode timed; a new batch shape retraces it) and compares with the reference.

        Under loss scaling the step keeps the scale the timed steps settled on: a fresh scale (2^15) skips the first
        steps' updates in float16, which would compare no step at all."""
        import numpy as np

        model.set_weights(self.initial)
        scale = getattr(model.optimizer, "dynamic_scale", None)
        for variable, value in zip(model.optimizer.variables, fresh_optimizer):
            if variable is not scale:
                variable.assign(value)
        model.reset_metrics()
        loss = float(step(self._batch(strategy)))
        state = optimizer_state(model)
        trainable, moving, worst = 0.0, 0.0, ("", 0.0)
        for (path, is_trainable, ref), w0, variable in zip(self.reference, self.initial, model.weights):
            got = np.asarray(variable.numpy(), np.float64)
            if got.shape != ref.shape:
                raise RuntimeError(f"agreement: {variable.path} {got.shape} against the reference's {path} "
                                   f"{ref.shape}")
            if not ref.size:
                continue
            diff = float(np.max(np.abs(got - ref)))
            if is_trainable:
                trainable = max(trainable, diff)
                own_update = float(np.max(np.abs(ref - w0)))
                relative = diff / own_update if own_update > 0 else (0.0 if diff == 0 else math.inf)
                if relative > worst[1]:
                    worst = (path, relative)
            else:
                moving = max(moving, diff / (float(np.max(np.abs(ref))) or 1.0))
        return {
            "batch": self.batch_size, "policy": policy, "xla_compiled": xla_compiled, "loss": loss,
            "reference_loss": self.reference_loss, "loss_rel_diff": abs(loss - self.reference_loss)
            / abs(self.reference_loss), "weights_max_abs_diff": trainable,
            "weights_diff_over_update": trainable / self.largest_update if self.largest_update else None,
            "weights_diff_over_weight": trainable / self.largest_weight if self.largest_weight else None,
            "worst_variable": worst[0], "worst_variable_diff_over_its_update": worst[1],
            "moving_stats_max_rel_diff": moving,
            **({"skipped_steps": state["skipped_steps"], "loss_scale": state["loss_scale"]} if state else {}),
        }

    def summary(self) -> dict:
        return {"batch": self.batch_size, "reference": "float64, one device", "reference_loss": self.reference_loss,
                "reference_loss_metric": self.reference_metric_loss, "reference_largest_update": self.largest_update,
                "reference_largest_weight": self.largest_weight}


def pipeline(preset: dict, batch_size: int, args: dict) -> dict:
    """Host view pairs/s of bt_keras's input pipeline with synthetic in-memory images, in both augment_on modes."""
    import numpy as np
    import tensorflow as tf

    from bt_keras import augment, data
    from benchmarks.input_pipeline import measure, smooth_images

    size = preset["image_size"]
    rng = np.random.default_rng(0)
    count = max(2 * batch_size, args["pipeline_images"])
    if preset["pipeline"] == "uint8":
        source = tf.data.Dataset.from_tensor_slices(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
        views, encoded, note = augment.cifar_views(size), False, f"{count} random uint8 {size} px images in memory"
    else:
        sides = (300, 500) if size >= 224 else (int(size * 1.25), 2 * size)
        unique = [tf.io.encode_jpeg(image, quality=90).numpy()
                  for image in smooth_images(rng, min(args["pipeline_images"], count), sides)]
        jpegs = [unique[i % len(unique)] for i in range(count)]
        views, encoded = augment.imagenet_views(size), True
        note = (f"{len(unique)} synthetic {sides[0]}-{sides[1]} px JPEGs (quality 90) in memory, repeated to {count}; "
                "decode + random resized crop per image")
        source = tf.data.Dataset.from_tensor_slices(jpegs)
    out = {"note": note, "batch": batch_size}
    for mode in ("host", "accelerator"):
        progress(f"{preset['name']} input pipeline: augment_on={mode}")
        dataset = data.pair_batches(source, batch_size=batch_size, views=views, encoded=encoded, seed=0,
                                    shuffle_buffer=count, augment_on=mode)
        out[mode] = measure(dataset, batch_size, args["pipeline_warmup"], args["pipeline_batches"],
                            args["pipeline_reps"])
    return out


def environment(strategy) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    build = dict(tf.sysconfig.get_build_info())
    kind = ("TPU" if isinstance(strategy, tf.distribute.TPUStrategy) else "GPU" if gpus else "CPU")
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device_kind": kind,
            "devices": [d.name for d in tf.config.list_logical_devices()],
            "gpu_name": details.get("device_name"), "gpu_compute_capability": details.get("compute_capability"),
            "gpus": len(gpus), "cuda_build_version": build.get("cuda_version"),
            "cudnn_build_version": build.get("cudnn_version"), "is_cuda_build": build.get("is_cuda_build"),
            "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync}


def run_child(job: dict) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bt_keras import distribute
    from bt_keras.method import precision

    started = time.perf_counter()
    strategy = distribute.make_strategy(job["strategy"], job.get("tpu"))
    env = environment(strategy)
    kind = env["device_kind"]
    mixed_policy = job["mixed_policy"] or ("mixed_bfloat16" if kind in ("TPU", "CPU") else
                                           precision.mixed_policy_for(strategy))
    memory = Memory(f"{kind}:0" if kind in ("GPU", "TPU") else None)
    preset = dict(job["preset"], name=job["name"])
    progress(f"{job['name']}: {kind} ({env['gpu_name'] or env['devices'][0]}), {env['replicas']} replica(s), "
             f"mixed = {mixed_policy}")
    result = {"environment": env, "preset": preset, "mixed_policy": mixed_policy, "modes": {}}
    agreement, agreement_error = None, None
    if job["agreement"]:
        batch = job["agreement_batch"] or preset["agreement_batch"] * (1 if preset["batch_is_global"] else
                                                                       strategy.num_replicas_in_sync)
        try:
            agreement = Agreement(preset, batch, job["agreement_xla"])
        except Exception as error:  # noqa: BLE001 (e.g. no float64 kernels on a TPU): recorded, the rest runs
            agreement_error = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            progress(f"{job['name']} agreement: the float64 reference failed ({agreement_error[:120]})")
    for mode in job["modes"]:
        try:
            result["modes"][mode] = run_mode(preset, mode, strategy, mixed_policy, memory, job, agreement)
        except NoBatchFits as error:
            result["modes"][mode] = {"error": str(error)}
            progress(f"{job['name']} {mode}: {error}")
    if agreement_error:
        result["agreement"] = {"error": agreement_error}
    if agreement is not None:
        result["agreement"] = {**agreement.summary(), "steps": {
            mode: r.pop("agreement") for mode, r in result["modes"].items() if "agreement" in r}}
    measured = {m: r for m, r in result["modes"].items() if "error" not in r}
    if job["pipeline"] and measured:
        fastest = max(measured, key=lambda m: measured[m]["barlow_twins"]["pairs_per_s"])
        step_rate = measured[fastest]["barlow_twins"]["pairs_per_s"]
        out = pipeline(preset, measured[fastest]["barlow_twins"]["global_batch"], job)
        out["step_consumes_pairs_per_s"] = step_rate
        out["step_mode"] = fastest
        for mode in ("host", "accelerator"):
            out[mode]["over_step"] = out[mode]["pairs_per_s_median"] / step_rate
        result["input_pipeline"] = out
    result["child_s"] = time.perf_counter() - started
    return summarize(result)


# ----------------------------------------------------------------------------------------------------------------
# Parent: one child per preset, progress streamed, tables, JSON.
# ----------------------------------------------------------------------------------------------------------------

def run_job(job: dict, log_path: Path, smoke: bool) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    if smoke:
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), SMOKE_XLA_FLAGS]))
    cmd = harness.child_command("accelerator", "--child", json.dumps(job))
    started = time.perf_counter()
    result = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=harness.REPO)
        for line in proc.stdout:
            if line.startswith("# "):
                print(f"  [{time.perf_counter() - started:5.0f} s] {line[2:].rstrip()}\n", end="", flush=True)
            elif line.startswith("{"):
                result = json.loads(line)
        code = proc.wait()
    if code != 0 or result is None:
        tail = " | ".join(log_path.read_text().strip().splitlines()[-3:])[-400:]
        print(f"  {job['name']}: the child failed (exit {code}): {tail}", flush=True)
        return {"error": f"child exited with {code}: {tail} (log: {log_path})", "preset": job["preset"]}
    return result


def run_jobs(jobs: list[dict], output: Path, smoke: bool, parallel: int) -> dict:
    """One child per preset; `parallel` at a time (a smoke run uses both presets' children at once: its numbers are
    not measurements, and tracing and compiling are mostly single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(job):
        print(f"{job['name']}: starting a child process\n", end="", flush=True)  # one write: threads interleave
        return run_job(job, output.with_name(f"{output.stem}.{job['name']}.log"), smoke)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        results = list(pool.map(one, jobs))
    return {job["name"]: result for job, result in zip(jobs, results)}


def _gib(n) -> str:
    return f"{n / 2**30:.2f}" if n is not None else ""


def _rate(flop_per_s: float) -> str:
    tflops = flop_per_s / 1e12
    return f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}"


def format_tables(report: dict) -> str:
    rows, agreement_rows, pipeline_rows = [], [], []
    for name, preset in report["presets"].items():
        if "error" in preset:
            rows.append((name, "error", preset["error"]) + ("",) * 10)
            continue
        for mode, r in preset["modes"].items():
            if "error" in r:
                rows.append((name, mode, r["error"][:60]) + ("",) * 10)
                continue
            bt, sup = r["barlow_twins"], r["supervised"]
            rows.append((
                name, f"{mode} ({r['policy']}{', XLA' if bt['xla_compiled'] else ''})",
                f"{bt['per_replica_batch']}", f"{bt['pairs_per_s']:.1f}", _rate(bt["flop_per_s"]),
                _gib(bt["peak_memory_bytes"]), f"{sup['images_per_s']:.1f}", _rate(sup["flop_per_s"]),
                _gib(sup["peak_memory_bytes"]), f"{r['bt_over_supervised_flops']:.2f}",
                f"{r['over_float32']:.2f}" if "over_float32" in r else "",
                f"{bt['first_step_s']:.1f} / {sup['first_step_s']:.1f}",
                "" if bt.get("skipped_steps_total") is None else
                f"{bt['skipped_steps_total']:.0f} ({bt['skipped_steps_timed']:.0f} timed)"))
        a = preset.get("agreement")
        if a and "error" in a:
            agreement_rows.append((name, "error: " + a["error"][:80], "", "", "", "", "", ""))
        elif a:
            for step, s in a["steps"].items():
                if "skipped" in s or "error" in s:
                    why = ("(XLA at another batch:", "--agreement-xla)") if "skipped" in s else ("error:",
                                                                                              s["error"][:60])
                    agreement_rows.append((name, f"{step}: not compared", "", *why, "", "", ""))
                    continue
                agreement_rows.append((
                    name, f"{step} ({s['policy']}{', XLA' if s['xla_compiled'] else ''})", f"{a['batch']}",
                    f"{s['loss_rel_diff']:.1e}", f"{s['weights_diff_over_update']:.1e}",
                    f"{s['weights_diff_over_weight']:.1e}", f"{s['moving_stats_max_rel_diff']:.1e}",
                    f"{s.get('skipped_steps', '')}"))
        p = preset.get("input_pipeline")
        if p:
            for mode in ("host", "accelerator"):
                pipeline_rows.append((name, mode, f"{p['batch']}", f"{p[mode]['pairs_per_s_median']:.1f}",
                                      f"{p[mode]['pairs_per_cpu_second']:.1f}",
                                      f"{p['step_consumes_pairs_per_s']:.1f} ({p['step_mode']})",
                                      f"{p[mode]['over_step']:.2f}"))
    out = [harness.markdown_table(("preset", "mode", "batch/device", "BT pairs/s", "BT TFLOP/s", "BT peak GiB",
                                   "sup img/s", "sup TFLOP/s", "sup peak GiB", "BT/sup FLOP/s", "BT vs float32",
                                   "first step s (BT / sup)", "skipped"), rows)]
    if agreement_rows:
        out += ["", "One step against float64 (same weights, same batch; differences relative to the float64 step):",
                "", harness.markdown_table(("preset", "step", "batch", "loss rel diff",
                                            "weights diff / largest update", "weights diff / largest weight",
                                            "BN moving stats rel diff", "skipped"), agreement_rows)]
    if pipeline_rows:
        out += ["", "Host input pipeline (synthetic in-memory images) against what the step consumes:", "",
                harness.markdown_table(("preset", "augment_on", "batch", "host pairs/s", "pairs/CPU-s",
                                        "step consumes pairs/s", "pipeline / step"), pipeline_rows)]
    goal_rows = [(g["name"], "" if g["measured"] is None else f"{g['measured']:.2f}", f">= {g['target']}",
                  {True: "yes", False: "no", None: "n/a (smoke)" if report["smoke"] else "n/a"}[g["met"]])
                 for g in report["goals"]]
    out += ["", harness.markdown_table(("goal", "measured", "target", "met"), goal_rows)]
    return "\n".join(out)


def host_info() -> dict:
    from bt_keras.train.host import usable_cores  # loads no TensorFlow

    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        info["usable_cores"] = usable_cores()
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration, AttributeError):
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0:
            info["nvidia_smi"] = [l.strip() for l in smi.stdout.splitlines() if l.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def build_jobs(args) -> list[dict]:
    defaults = SMOKE_DEFAULTS if args.smoke else DEFAULTS
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    jobs = []
    for name in args.preset:
        preset = dict(PRESETS[name], **(SMOKE[name] if args.smoke else {}))
        if name == "imagenet" and args.imagenet_batch:
            preset["batches"] = tuple(args.imagenet_batch)
        if name == "cifar" and args.cifar_batch:
            preset["batches"] = (args.cifar_batch,)
        jobs.append({"name": name, "preset": preset, "modes": list(args.modes), "strategy": args.strategy,
                     "tpu": args.tpu, "mixed_policy": args.mixed_policy, "agreement": not args.no_agreement,
                     "pipeline": not args.no_pipeline, "agreement_batch": args.agreement_batch,
                     "agreement_xla": args.agreement_xla, **settings})
    return jobs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, 1 warm-up + 2 timed steps: checks the code on a CPU; not a measurement")
    parser.add_argument("--preset", nargs="+", default=["cifar", "imagenet"], choices=sorted(PRESETS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--strategy", default="default", choices=["default", "mirrored", "tpu"],
                        help="default: one device (the first GPU); mirrored: all local GPUs; tpu: TPUStrategy")
    parser.add_argument("--tpu", default=None, help="TPU name or grpc:// address with --strategy tpu")
    parser.add_argument("--mixed-policy", default=None, choices=["mixed_float16", "mixed_bfloat16"],
                        help="default: mixed_float16 on GPUs, mixed_bfloat16 on TPUs and CPUs")
    parser.add_argument("--warmup", type=int, help="untimed steps per model (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, help="timed steps per model (default 10; smoke 2)")
    parser.add_argument("--imagenet-batch", type=int, nargs="+", help="per-device batches to try (default 256 128 64)")
    parser.add_argument("--cifar-batch", type=int, help="global batch (default 512)")
    parser.add_argument("--agreement-batch", type=int,
                        help="global pairs in the float64 agreement step (default: cifar 512, imagenet 64 per device; "
                             "smoke 16); the timed batch when equal, else the step is traced again at this batch")
    parser.add_argument("--no-agreement", action="store_true", help="skip the float64 agreement step")
    parser.add_argument("--agreement-xla", action="store_true",
                        help="compare the XLA mode too when the agreement batch is not the timed one (a second XLA "
                             "compile of the step: minutes for ResNet-50); by default it is compared only at the "
                             "timed batch")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the input pipeline measurement")
    parser.add_argument("--pipeline-warmup", type=int, help="untimed pipeline batches (default 2; smoke 1)")
    parser.add_argument("--pipeline-batches", type=int, help="timed pipeline batches per repetition (default 5)")
    parser.add_argument("--pipeline-reps", type=int, help="pipeline repetitions (median; default 3; smoke 1)")
    parser.add_argument("--pipeline-images", type=int, help="distinct synthetic images (default 64; smoke 32)")
    parser.add_argument("--parallel", type=int,
                        help="children (presets) at once: default 1, all with --smoke (not a measurement there)")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/accelerator.json, "
                                         "accelerator_smoke.json with --smoke); the child logs go beside it (.log)")
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    started = time.perf_counter()
    default_name = "accelerator_smoke.json" if args.smoke else "accelerator.json"
    output = Path(args.output) if args.output else harness.RESULTS / default_name
    output.parent.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(args)
    host = host_info()
    print(f"{'SMOKE RUN (tiny sizes: checks the code, measures nothing): ' if args.smoke else ''}"
          f"{len(jobs)} preset(s) x modes {', '.join(args.modes)}; {host.get('cpu', '?')}, "
          f"{host.get('usable_cores')} cores{'; ' + host['nvidia_smi'][0] if host.get('nvidia_smi') else ''}",
          flush=True)
    parallel = args.parallel if args.parallel is not None else (len(jobs) if args.smoke else 1)
    presets = run_jobs(jobs, output, args.smoke, parallel)
    first = next((p["environment"] for p in presets.values() if "environment" in p), {})
    report = {
        "smoke": bool(args.smoke),
        "device": first.get("gpu_name") or first.get("device_kind") or "unknown",
        "environment": first, "host": host, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "timing": "warm-up steps untimed; timed steps back to back, one sync at the end "
                  "(tf.test.experimental.sync_devices + the last loss read back)",
        "settings": {k: v for k, v in jobs[0].items() if k not in ("name", "preset")} if jobs else {},
        "presets": presets,
    }
    report["goals"] = goals(presets, report["smoke"])
    report["wall_s"] = time.perf_counter() - started
    print()
    print(format_tables(report))
    harness.write_json(output, report)
    print(f"\n{'SMOKE (CPU-sized, not a GPU figure): ' if args.smoke else ''}wrote {output} "
          f"({report['wall_s']:.0f} s)")
    return 0 if all("error" not in p for p in presets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

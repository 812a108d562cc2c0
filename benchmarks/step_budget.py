"""Where one Barlow Twins training step's time goes: its parts timed one by one, in one process.

benchmarks.train_step measures the whole step; a profile lists op types. This script answers the next question,
"how close to the matmul rate can this step get with these kernels?", by timing each part of the step on its own,
with the same shapes, threads and kernels, round-robin (one call of each part per round, median over rounds):

  encoder     forward + backward of both views through the ResNet (BatchNorm in training mode), gradients for the
              encoder's variables, with a fixed upstream gradient
  projector   forward + backward of the projector on both views' features (`heads.project_views`), gradients for
              its variables and for the features (the encoder needs them)
  loss        `losses.barlow_twins_loss` forward + backward for the two embeddings
  optimizer   `LARS.apply_gradients` for every trainable variable (the native kernel where it applies)
  step        `BarlowTwins.train_step`: all of the above together, as `fit` runs it

and, as references measured in the same process:

  matmul         fp32 4096 x 4096 matmul rate (GFLOP/s; $BT_KERAS_BENCHMARK_MATMUL_SIZE for another size, as the tests
                 of the benchmarks do), as benchmarks.train_step measures it (harness.matmul_fn):
                 the denominator of every "% matmul"
  skinny matmul  the projector's widest product, [2 x batch, D] x [D, D], forward only: what a layer of the
                 projector can reach at this batch
  stream GB/s    x + 1 on a 256 MiB tensor (reads and writes it once): the memory bandwidth that bounds the
                 optimizer's passes

Each part's GFLOP counts the same multiply-adds as benchmarks.train_step (harness.count_flops: 2 x 3 x MACs, both
views). The loss is counted, as there, as the D x D cross-correlation (3 x 2 x D^2 per image); on one replica it is
computed in the Gram form, with far fewer FLOPs, so no rate is shown for it. The summary line says what the parts
imply: the step's % of the matmul rate if every part ran at its measured speed, one after the other.

Examples:
  python -m benchmarks.step_budget                        # imagenet_small (~2 min)
  python -m benchmarks.step_budget --preset cifar
  python -m benchmarks.step_budget --backbone resnet50 --image-size 64 --batch-size 16 --projector 4096-4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if not __package__:  # `python benchmarks/step_budget.py`: the benchmarks package is not importable that way
    raise SystemExit("Run it from the repository root as a module: python -m benchmarks.step_budget [flags]")
from benchmarks import harness  # presets, FLOP counting, matmul rate, machine info, tables, JSON

WARMUP_CALLS = 2  # untimed calls of each function before the timed rounds (tracing, allocator growth)


def _interleaved_medians(functions: dict, repeats: int) -> dict:
    """Median seconds per function, timed round-robin (one call of each per round, after WARMUP_CALLS calls each), so
    that a slower or faster spell of a shared machine affects every function alike."""
    for fn in functions.values():
        for _ in range(WARMUP_CALLS):
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _checksum(tensors):
    """One scalar that depends on every tensor (so none is pruned), costing one element read each."""
    import tensorflow as tf

    return tf.add_n([tf.reshape(t, [-1])[0] for t in tensors])


def measure(config: dict, repeats: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bt_keras.train import host

    host.configure_threads(None, None)
    import keras
    import numpy as np
    import tensorflow as tf

    from bt_keras import BarlowTwins
    from bt_keras.method import losses
    from bt_keras.method.optim import LARS
    from bt_keras.nets import backbones, heads

    size, batch = config["image_size"], config["batch_size"]
    keras.utils.set_random_seed(0)
    encoder = backbones.get_backbone(config["backbone"], input_shape=(size, size, 3), stem=config["stem"])
    model = BarlowTwins(encoder, heads.projector(config["projector"]))
    model.compile(optimizer=LARS(0.3 * batch / 256, eta=0.02, weight_decay=1e-4))
    flops = harness.count_flops(model, batch)
    dim = flops["embedding_dim"]
    features_dim = int(encoder.output_shape[-1])

    rng = np.random.default_rng(0)
    normal = lambda *shape: tf.constant(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    view1, view2 = normal(batch, size, size, 3), normal(batch, size, size, 3)
    upstream1, upstream2 = normal(batch, features_dim), normal(batch, features_dim)
    features1, features2 = normal(batch, features_dim), normal(batch, features_dim)
    z1, z2 = normal(batch, dim), normal(batch, dim)

    @tf.function
    def encoder_part():
        with tf.GradientTape() as tape:
            outputs = [encoder(view1, training=True), encoder(view2, training=True)]
        return _checksum(tape.gradient(outputs, encoder.trainable_variables, output_gradients=[upstream1, upstream2]))

    @tf.function
    def projector_part():
        with tf.GradientTape() as tape:
            tape.watch([features1, features2])
            e1, e2 = heads.project_views(model.projector, features1, features2, training=True)
            objective = tf.reduce_sum(e1 * z1) + tf.reduce_sum(e2 * z2)
        return _checksum(tape.gradient(objective, model.projector.trainable_variables + [features1, features2]))

    @tf.function
    def loss_part():
        with tf.GradientTape() as tape:
            tape.watch([z1, z2])
            loss = losses.barlow_twins_loss(z1, z2, model.lambd)["loss"]
        return _checksum(tape.gradient(loss, [z1, z2]))

    variables = model.trainable_variables
    gradients = [tf.constant(1e-6 * rng.standard_normal(v.shape, dtype=np.float32)) for v in variables]

    @tf.function
    def optimizer_part():
        model.optimizer.apply_gradients(zip(gradients, variables))
        return _checksum(variables)

    @tf.function
    def step():
        return model.train_step((view1, view2))["loss"]

    huge = tf.fill([64 * 2**20], 1.0)  # 256 MiB
    stream = tf.function(lambda: tf.reshape(huge + 1.0, [-1])[0])  # reads 256 MiB, writes 256 MiB
    skinny_x, skinny_w = normal(2 * batch, dim), normal(dim, dim)
    skinny = tf.function(lambda: tf.reduce_sum(tf.matmul(skinny_x, skinny_w)[:1, :1]))
    matmul = harness.matmul_fn(tf)

    encoder_gflop = 2 * 3 * 2 * flops["encoder_gmac_per_view"] * batch
    projector_gflop = 2 * 3 * 2 * flops["projector_gmac_per_view"] * batch
    loss_gflop = 3 * 2 * dim * dim * batch / 1e9
    parameters = sum(int(np.prod(v.shape)) for v in variables)
    parts = [
        ("encoder", encoder_part, encoder_gflop),
        ("projector", projector_part, projector_gflop),
        ("loss", loss_part, loss_gflop),
        ("optimizer", optimizer_part, 0.0),
    ]
    timed = {name: fn for name, fn, _ in parts}
    timed.update(step=step, stream=stream, skinny=skinny)
    calls = {name: (lambda fn=fn: fn().numpy()) for name, fn in timed.items()}
    rates = []
    calls["matmul"] = lambda: rates.append(matmul())  # the denominator, measured in every round too
    seconds = _interleaved_medians(calls, repeats)
    results = {name: {"s": seconds[name], "gflop": gflop} for name, _, gflop in parts}
    step_s, stream_s, skinny_s = seconds["step"], seconds["stream"], seconds["skinny"]
    rate = statistics.median(rates[WARMUP_CALLS:])  # the timed rounds' rates only

    total_gflop = flops["gflop_per_step"]
    parts_s = sum(r["s"] for r in results.values())
    for r in results.values():
        r["gflops"] = r["gflop"] / r["s"]
        r["fraction_of_matmul"] = r["gflops"] / rate
        r["share_of_parts"] = r["s"] / parts_s
    # The native LARS kernel passes over each float32 variable twice: reads w, g; then reads w, g, m and writes w, m.
    optimizer_bytes = 7 * 4 * parameters
    return {
        "config": config,
        "parts": results,
        "step": {"s": step_s, "gflop": total_gflop, "gflops": total_gflop / step_s,
                 "fraction_of_matmul": total_gflop / step_s / rate},
        "sum_of_parts_s": parts_s,
        "ceiling_fraction_of_matmul": total_gflop / parts_s / rate,
        "matmul_gflops": rate,
        "matmul_size": matmul.size,
        "skinny_matmul": {"shape": [2 * batch, dim, dim], "s": skinny_s,
                          "gflops": 2 * 2 * batch * dim * dim / skinny_s / 1e9},
        "stream_gb_per_s": 2 * huge.shape[0] * 4 / stream_s / 1e9,
        "optimizer": {"parameters": parameters, "bytes_moved": optimizer_bytes,
                      "gb_per_s": optimizer_bytes / results["optimizer"]["s"] / 1e9},
    }


def format_report(r: dict) -> str:
    rate = r["matmul_gflops"]

    def rate_cells(name, p):
        if name == "loss" or not p["gflop"]:  # see the module docstring: the loss's FLOPs are nominal
            return "-", "-"
        return f"{p['gflops']:.0f}", f"{100 * p['fraction_of_matmul']:.0f}%"

    rows = [(name, f"{p['s'] * 1e3:.0f}", f"{p['gflop']:.1f}", *rate_cells(name, p), f"{100 * p['share_of_parts']:.0f}%")
            for name, p in r["parts"].items()]
    rows.append(("sum of parts", f"{r['sum_of_parts_s'] * 1e3:.0f}", f"{r['step']['gflop']:.1f}",
                 f"{r['step']['gflop'] / r['sum_of_parts_s']:.0f}", f"{100 * r['ceiling_fraction_of_matmul']:.0f}%",
                 "100%"))
    rows.append(("train_step", f"{r['step']['s'] * 1e3:.0f}", f"{r['step']['gflop']:.1f}",
                 f"{r['step']['gflops']:.0f}", f"{100 * r['step']['fraction_of_matmul']:.0f}%", ""))
    header = ("part", "ms", "GFLOP", "GFLOP/s", "% matmul", "share")
    table = harness.markdown_table(header, rows)
    skinny, optimizer = r["skinny_matmul"], r["optimizer"]
    notes = [
        f"matmul ({r.get('matmul_size', 4096)}^3): {rate:.0f} GFLOP/s; skinny matmul {skinny['shape']}: {skinny['gflops']:.0f} GFLOP/s "
        f"({100 * skinny['gflops'] / rate:.0f}%)",
        f"optimizer: {optimizer['parameters'] / 1e6:.1f} M parameters, {optimizer['bytes_moved'] / 1e9:.2f} GB moved "
        f"at {optimizer['gb_per_s']:.1f} GB/s; streaming (x + 1 on 256 MiB: read + write) runs at "
        f"{r['stream_gb_per_s']:.1f} GB/s",
        f"if every part ran as measured, one after the other, the step would reach "
        f"{100 * r['ceiling_fraction_of_matmul']:.0f}% of the matmul rate; train_step reaches "
        f"{100 * r['step']['fraction_of_matmul']:.0f}%",
    ]
    return "\n".join([table, ""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="imagenet_small", choices=sorted(harness.PRESETS))
    parser.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "small_cnn"],
                        help="small_cnn: three conv layers, a quick check of the script (the stem does not apply)")
    parser.add_argument("--stem", choices=["imagenet", "cifar"])
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--projector", help='e.g. "8192-8192-8192"')
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per part (median reported)")
    parser.add_argument("--output", default=str(harness.RESULTS / "step_budget.json"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    config = dict(harness.PRESETS[args.preset], preset=args.preset)
    for key in ("backbone", "stem", "image_size", "batch_size", "projector"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    info = {"machine": harness.machine_info(), "command": " ".join(sys.argv)}
    print(f"{info['machine'].get('cpu', '?')}, {info['machine'].get('usable_cores')} cores; {config}", flush=True)
    result = measure(config, args.repeats)
    print(format_report(result))
    output = harness.write_json(args.output, {**info, **result})
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()

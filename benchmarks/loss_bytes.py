"""Bytes each replica sends per step for the Barlow Twins loss, in both forms, measured on the op graph.

The paper's setting (global batch B = 2048 over R = 16 replicas, D = 8192) cannot be traced here usefully, so the
loss's forward and backward pass is traced (not run) under MirroredStrategy over R logical CPU devices at smaller
widths D with the same B / D, and the bytes are read from the collective ops of each graph (benchmarks.collectives:
every all-reduce and all-gather's input shape, counted as a ring algorithm sends them). With B proportional to D,
the bytes are a quadratic in D (D x D for C, B x D for the gathered embeddings, D for the statistics); the quadratic
through the first three widths is checked against the fourth, then evaluated at the target D, and compared with the
cost model of bt_keras.method.loss_forms at the target.

    python -m benchmarks.loss_bytes      # R 16, B 2048, D 8192; traces D 128 ... 1024 (~1 min), writes JSON
"""

from __future__ import annotations

import argparse
import os

if not __package__:  # `python benchmarks/loss_bytes.py`: the benchmarks package is not importable that way
    raise SystemExit("Run it from the repository root as a module: python -m benchmarks.loss_bytes [flags]")
from benchmarks import harness


def trace_loss_bytes(strategy, batch: int, dim: int, form: str) -> dict:
    """Per-replica bytes sent by the loss's forward + backward pass in `form`, from the traced graph's ops."""
    import tensorflow as tf

    from benchmarks import collectives
    from bt_keras.method import loss_forms
    from bt_keras.method.losses import barlow_twins_loss

    replicas = strategy.num_replicas_in_sync

    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            objective = barlow_twins_loss(a, b)["loss"] / replicas  # as BarlowTwins.compute_gradients
        return tape.gradient(objective, [a, b])

    z = tf.zeros([batch, dim])
    z1, z2 = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((z, z)))))
    loss_forms.set_form(form)
    try:
        graph = tf.function(lambda a, b: strategy.run(step, args=(a, b))).get_concrete_function(z1, z2).graph
    finally:
        loss_forms.set_form(None)
    ops = collectives.collective_ops(graph)
    mine = [op for op in ops if op.replica == 0]
    return {"batch": batch, "dim": dim, "bytes_sent": collectives.bytes_sent_per_replica(ops),
            "ops": [{"type": op.type, "shape": list(op.shape), "dtype": op.dtype, "bytes_sent": op.bytes_sent()}
                    for op in mine]}


def quadratic_through(points):
    """Coefficients (a, b, c) of a D^2 + b D + c through three (D, bytes) points."""
    import numpy as np

    d = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    return np.linalg.solve(np.stack([d**2, d, np.ones_like(d)], axis=1), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2048, help="the target global batch")
    parser.add_argument("--dim", type=int, default=8192, help="the target embedding width D")
    parser.add_argument("--trace-dims", type=int, nargs=4, default=[128, 256, 512, 1024],
                        help="widths traced (B scaled with them); the fit uses the first three, checks the fourth")
    parser.add_argument("--output", default=str(harness.RESULTS / "loss_bytes.json"))
    args = parser.parse_args()
    ratio = args.batch / args.dim
    for d in args.trace_dims:
        if round(d * ratio) % args.replicas or round(d * ratio) != d * ratio:
            raise SystemExit(f"--trace-dims {d}: B = {d * ratio} must be a whole multiple of {args.replicas} replicas")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    from bt_keras.method import loss_forms

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])
    report = {"replicas": args.replicas, "target": {"batch": args.batch, "dim": args.dim}, "forms": {}}
    for form in loss_forms.FORMS:
        traced = [trace_loss_bytes(strategy, int(d * ratio), d, form) for d in args.trace_dims]
        a, b, c = quadratic_through([(t["dim"], t["bytes_sent"]) for t in traced[:3]])
        check_dim = traced[3]["dim"]
        predicted_check = a * check_dim**2 + b * check_dim + c
        extrapolated = a * args.dim**2 + b * args.dim + c
        model = loss_forms.costs(args.batch, args.dim, args.replicas)[form]
        report["forms"][form] = {
            "traced": traced,
            "fit": {"a": a, "b": b, "c": c, "check_dim": check_dim, "check_predicted": predicted_check,
                    "check_measured": traced[3]["bytes_sent"]},
            "extrapolated_bytes": extrapolated,
            "model_bytes": model.bytes_sent,
            "model_collectives": [c_.purpose for c_ in model.collectives],
        }
    gram, corr = report["forms"]["gram"], report["forms"]["correlation"]
    report["ratio_gram_over_correlation"] = gram["extrapolated_bytes"] / corr["extrapolated_bytes"]

    print(f"Loss collectives, bytes sent per replica per step, R = {args.replicas}, B = {args.batch}, D = {args.dim}")
    print(f"(measured on traced graphs at D = {args.trace_dims}, B = D x {ratio:g}; quadratic in D through the first "
          "three, checked on the fourth)\n")
    print("| form | traced (MiB) | check: predicted / measured at D = %d | extrapolated | cost model |" % check_dim)
    print("|---|---|---|---|---|")
    for form, r in report["forms"].items():
        traced = ", ".join(f"{t['bytes_sent'] / 2**20:.3f}" for t in r["traced"])
        print(f"| {form} | {traced} | {r['fit']['check_predicted'] / 2**20:.4f} / {r['fit']['check_measured'] / 2**20:.4f}"
              f" | {r['extrapolated_bytes'] / 2**20:.1f} MiB | {r['model_bytes'] / 2**20:.1f} MiB |")
    print(f"\nGram form / correlation form: {report['ratio_gram_over_correlation']:.3f} (goal: at most 1/3)")
    harness.write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

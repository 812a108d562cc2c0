"""What the trainer's all-finite check of the updated weights costs per step (`bt_keras.train.step.with_state_check`).

The trainer's step reads every weight and BatchNorm statistic after the update (`is_finite` + `reduce_all` per
variable, inside the replica step) so that no checkpoint or encoder is written from a step whose update poisoned them.
This times, in one process on one device, the trainer's step with the check and without it, in alternating blocks (so
a slow-down of the machine hits both alike), on a batch already in memory, and the check alone:

    python -m benchmarks.finite_guard                                  # ResNet-18 (CIFAR stem), 32 px, batch 64
    python -m benchmarks.finite_guard --backbone resnet50 --image-size 64 --batch-size 16 --projector 8192-8192-8192
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import harness


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--projector", default="2048-2048-2048")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks of each variant")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--output", default="benchmarks/results/finite_guard.json")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from bt_keras.assembly import builders
    from bt_keras.config import complete
    from bt_keras.train import step as step_lib
    from experiments import quickstart

    config = quickstart.get_config()
    config.update(dict(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size,
                       projector=args.projector, epochs=1000))
    config.knn.every_epochs = 0
    config = complete(config)
    model = builders.build_training_model(config, builders.run_data(config))
    strategy = tf.distribute.get_strategy()
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    batch = (tf.random.normal(shape), tf.random.normal(shape))
    if model.online_probe is not None:
        batch = batch + (tf.zeros([args.batch_size], tf.int64),)

    def trainer_step(check_state: bool):
        replica_step = step_lib.replica_step(model, strategy, False, check_state=check_state)

        @tf.function
        def step(batch):
            outputs = strategy.run(replica_step, args=(batch,))
            return strategy.experimental_local_results(outputs["loss"])[0]

        return step

    variables = step_lib.state_variables(model)
    check_alone = tf.function(lambda: step_lib.all_finite(variables))
    steps = {"without check": trainer_step(False), "with check": trainer_step(True)}
    for step in steps.values():  # trace and warm up
        float(step(batch))
        float(step(batch))
    times = {name: [] for name in steps}
    for _ in range(args.blocks):
        for name, step in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                float(step(batch))
                times[name].append(time.perf_counter() - start)
    bool(check_alone())
    alone = []
    for _ in range(50):
        start = time.perf_counter()
        bool(check_alone())
        alone.append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "config": vars(args), "variables": len(variables),
        "elements": int(sum(int(tf.size(v)) for v in variables)),
        "step_s_median": medians,
        "ratio_with_over_without": medians["with check"] / medians["without check"],
        "check_alone_ms_median": 1000 * statistics.median(alone),
        "machine": harness.machine_info(), "versions": harness.versions(),
    }
    print(harness.markdown_table(
        ["variant", "median step (ms)"], [[name, f"{1000 * value:.1f}"] for name, value in medians.items()]))
    print(f"{report['variables']} variables, {report['elements']:,} elements; with/without = "
          f"{report['ratio_with_over_without']:.4f}; the check alone: {report['check_alone_ms_median']:.2f} ms")
    harness.write_json(args.output, report)
    return report


if __name__ == "__main__":
    main()

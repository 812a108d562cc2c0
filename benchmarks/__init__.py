"""Speed and memory measurements of bt_keras, run from the repository root as modules (README.md here says more).

    python -m benchmarks.train_step       the whole training step against the matmul rate (allocators, replicas)
    python -m benchmarks.step_budget      the step's parts timed one by one
    python -m benchmarks.input_pipeline   tf.data view pairs per second
    python -m benchmarks.loss_bytes       bytes the loss sends per replica, in both forms
    python -m benchmarks.accelerator      GPU / TPU throughput, mixed precision and XLA (--smoke on a CPU)

Shared pieces live in `benchmarks.harness`; `benchmarks.collectives` reads a traced step's collective ops.
"""

"""Mixed precision users can rely on (bt_keras.method.precision), under both policies GPUs and TPUs train in.

* A few steps are finite and close to float32, from the same weights and batches. The bounds come from the
  formats' unit round-off u (bfloat16: 2^-8 = 3.9e-3, float16: 2^-11 = 4.9e-4): the loss is reduced in float32 from
  embeddings rounded once to the compute type, so it must agree to ~2u (measured: 1.9e-3 / 3.0e-3 for bfloat16,
  1.3e-4 / 6.4e-4 for float16); the weights after three LARS steps to a few percent of how far float32's moved
  (measured 1.4% / 0.66%), since LARS normalises each update and only its direction carries the error.
* A run ends at its schedule's end although dynamic loss scaling skipped steps (each skipped step still counts:
  the batch was consumed), says how many it skipped (`skipped_steps`, `loss_scale` in metrics.jsonl), and a rerun
  of the finished run trains nothing.
* A run stopped after an epoch and resumed ends with exactly the weights of the uninterrupted run (loss scale and
  skipped-step count are in the checkpoint).
* The encoder a mixed run saves is float32 throughout and gives the trained encoder's features.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import bt_keras  # noqa: F401  (registers the classes saved models need)
from bt_keras import paths
from bt_keras.assembly import artifacts
from bt_keras.method import precision
from bt_keras.method.optim import LARS
from bt_keras.train.trainer import Trainer
from tests.helpers import cpu_strategy, run_cli, tiny_config, tiny_model, train_command, train_lines, view_pair

pytestmark = pytest.mark.accelerator

POLICIES = ["mixed_bfloat16", "mixed_float16"]
UNIT_ROUNDOFF = {"mixed_bfloat16": 2.0 ** -8, "mixed_float16": 2.0 ** -11}
WEIGHT_BOUND = {"mixed_bfloat16": 0.05, "mixed_float16": 0.02}  # of float32's weight movement (see the docstring)


def _three_steps(policy, initial, batches):
    """Loss at the initial weights and after three LARS steps, and the final weights, under `policy`."""
    lars = LARS(0.5, eta=0.02, weight_decay=1e-3)
    with precision.policy_scope(policy):
        model = tiny_model()
        model.set_weights(initial)
        # initial_scale 1: the comparison needs every step applied (the default 2^15 skips the first few, by design).
        optimizer = precision.LossScaleOptimizer(lars, initial_scale=1.0) if policy == "mixed_float16" else lars
        model.compile(optimizer=optimizer)
    losses = [float(model.compute_loss_terms(*batches[0], training=False)["loss"])]
    train_step = tf.function(model.train_step)
    for batch in batches:
        logs = train_step(batch)
        assert all(np.isfinite(float(v)) for v in logs.values()), logs
    losses.append(float(model.compute_loss_terms(*batches[0], training=False)["loss"]))
    if policy == "mixed_float16":
        assert int(model.optimizer.skipped_steps.numpy()) == 0 and int(model.optimizer.iterations.numpy()) == 3
    return losses, model.get_weights()


@pytest.fixture(scope="module")
def float32_steps():
    """The float32 reference both policies are compared with, run once: initial weights, batches, three steps."""
    initial = tiny_model().get_weights()
    batches = [tuple(tf.constant(v) for v in view_pair(32, seed=s)) for s in range(3)]
    return initial, batches, _three_steps("float32", initial, batches)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_a_few_steps_are_finite_and_close_to_float32(policy, float32_steps):
    initial, batches, (losses_32, weights_32) = float32_steps
    losses, weights = _three_steps(policy, initial, batches)
    relative = [abs(a - b) / abs(b) for a, b in zip(losses, losses_32)]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(weights_32, initial))
    apart = max(float(np.abs(a - b).max()) for a, b in zip(weights, weights_32))
    print(f"{policy}: loss relative error {relative}, weights {apart / moved:.2%} of float32's movement")
    assert max(relative) <= 2 * UNIT_ROUNDOFF[policy]
    assert apart <= WEIGHT_BOUND[policy] * moved


def test_a_skipped_step_counts_as_a_step_and_is_counted():
    variable = keras.Variable(np.ones(3, np.float32))
    optimizer = precision.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    optimizer.build([variable])
    optimizer.apply([tf.constant([np.inf, 1.0, 1.0])], [variable])  # overflowed: no update, the step still counts
    assert int(optimizer.iterations.numpy()) == 1 and int(optimizer.skipped_steps.numpy()) == 1
    assert float(optimizer.dynamic_scale.numpy()) == 2.0 ** 14 and np.all(variable.numpy() == 1.0)
    optimizer.apply([tf.constant([1.0, 1.0, 1.0]) * optimizer.dynamic_scale], [variable])
    assert int(optimizer.iterations.numpy()) == 2 and int(optimizer.skipped_steps.numpy()) == 1
    np.testing.assert_allclose(variable.numpy(), 0.9)


def test_fit_users_get_the_same_loss_scaling_unless_they_turn_it_off():
    with precision.policy_scope("mixed_float16"):
        model = tiny_model()
    model.compile(optimizer=LARS(0.1))
    assert isinstance(model.optimizer, precision.LossScaleOptimizer)
    model.compile(optimizer=LARS(0.1), auto_scale_loss=False)  # Keras's switch: no loss scaling at all
    assert isinstance(model.optimizer, LARS)


@pytest.mark.slow
def test_a_run_whose_gradients_never_fit_float16_stops_instead_of_finishing(tmp_path):
    """Loss scaling skips every step once the scale is below 1 (even unscaled gradients overflow): nothing trains,
    so the run stops as a non-finite loss does, keeping the last good checkpoint."""
    from bt_keras.train.trainer import NonFiniteLossError

    config = tiny_config(precision="mixed_float16", log_every_steps=1)
    trainer = Trainer(config, tmp_path, tf.distribute.get_strategy())
    trainer.model.optimizer.dynamic_scale.assign(0.5)
    with pytest.raises(NonFiniteLossError, match=r"loss scale fell to 0\.5 .* none of them trained") as error:
        trainer.run()
    assert "ckpt-0" in str(error.value) and [p.name for p in paths.latest_checkpoints(tmp_path)] == ["ckpt-0"]


def _stop_after_first_epoch():
    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    return Stop()


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_a_mixed_run_ends_on_schedule_resumes_exactly_and_saves_a_float32_encoder(policy, tmp_path):
    """Both policies: the run ends on schedule, logs finite losses (loss scaling under float16 only) and saves float32
    artefacts. Under mixed_float16 the checkpoint holds the loss-scaling optimizer (scale, skipped steps), so that
    run is also stopped after an epoch and resumed (exactly), and refused by another precision. mixed_bfloat16's
    checkpoint is plain LARS, resumed by the code float32 runs resume with (tests/train/test_resume.py). The rerun of
    a finished mixed run, which trains nothing, is the command's test below."""
    config = tiny_config(precision=policy, log_every_steps=1)
    total = config.epochs * config.steps_per_epoch
    strategy = tf.distribute.get_strategy()

    whole = Trainer(config, tmp_path / "whole", strategy)
    whole.run()
    assert whole.step == total  # skipped steps count: the run trains its schedule once
    lines = train_lines(tmp_path / "whole")
    assert lines[-1]["step"] == total and all(np.isfinite(line["loss"]) for line in lines)
    if policy == "mixed_float16":  # 2^15 overflows float16 at first: some steps skipped, and said so
        assert lines[-1]["skipped_steps"] >= 1 and lines[-1]["loss_scale"] < 2 ** 15
        assert int(whole.model.optimizer.skipped_steps.numpy()) == lines[-1]["skipped_steps"]
        from bt_keras.train import figures

        steps, skipped = figures.figure_data(tmp_path / "whole")["loss scaling"]["skipped_steps"]
        assert list(steps) == list(range(1, total + 1)) and skipped[-1] == lines[-1]["skipped_steps"]
        title = figures.figure(tmp_path / "whole")._suptitle.get_text()
        assert f"{int(skipped[-1])} step(s) skipped by loss scaling" in title
        # Its checkpoint holds the loss-scaling optimizer: no other precision resumes it.
        other = tiny_config(precision="float32", log_every_steps=1)
        with pytest.raises(ValueError, match="with --mixed_precision"):
            Trainer(other, tmp_path / "whole", strategy, allow_config_change=True)
    else:  # bfloat16 has float32's range: no loss scaling at all
        assert "loss_scale" not in lines[-1]

    encoder, projector, _ = artifacts.load_with_projector(tmp_path / "whole")  # what an export with the projector serves
    for part in (encoder, projector):
        assert {layer.dtype_policy.name for layer in part._flatten_layers(include_self=False)} == {"float32"}

    if policy == "mixed_float16":
        stopped = Trainer(config, tmp_path / "resumed", strategy)
        stopped.run([_stop_after_first_epoch()])
        assert stopped.step == config.steps_per_epoch
        resumed = Trainer(config, tmp_path / "resumed", strategy)
        assert resumed.start_step == config.steps_per_epoch
        resumed.run()
        for a, b in zip(whole.model.get_weights(), resumed.model.get_weights()):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(whole.model.optimizer.variables, resumed.model.optimizer.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())

    encoder = keras.saving.load_model(tmp_path / "whole" / paths.ENCODER_FILE)
    assert {layer.dtype_policy.name for layer in encoder._flatten_layers(include_self=False)} == {"float32"}
    images = view_pair(4, image_size=config.image_size)[0]
    features = encoder(images)
    assert features.dtype == tf.float32
    trained = whole.model.encoder(images)  # the mixed encoder itself: same weights, lower-precision arithmetic
    np.testing.assert_allclose(features.numpy(), tf.cast(trained, tf.float32).numpy(),
                               atol=20 * UNIT_ROUNDOFF[policy] * float(np.abs(features).max()))


@pytest.mark.slow
def test_the_mixed_precision_command_ends_on_schedule_quietly_and_a_rerun_trains_nothing(tmp_path):
    """The README's --mixed_precision on this CPU (mixed_float16): the quiet console shows no oneDNN notice; the
    finished run, started again, trains nothing (dynamic loss scaling skipped steps, which count)."""
    command = train_command(tmp_path / "run", "--mixed_precision", epochs=2, steps=3)
    first = run_cli(command)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Finished at step 6:" in first.stdout, first.stdout
    assert "DT_HALF" not in first.stderr and not any(line.startswith("E0") for line in first.stderr.splitlines()), \
        first.stderr
    lines = train_lines(tmp_path / "run")
    assert lines[-1]["step"] == 6 and lines[-1]["skipped_steps"] >= 1
    config = json.loads((tmp_path / "run" / paths.CONFIG_FILE).read_text())
    assert config["precision"] == "mixed_float16"
    # A rerun of the finished run trains nothing (in-process: the console was the first run's point; the command's
    # rerun of a finished run is tests/test_quickstart.py's). tiny_config with the command's settings is the config
    # the command recorded, or resuming would refuse the change.
    again = Trainer(tiny_config(precision="mixed_float16", log_every_steps=2), tmp_path / "run",
                    tf.distribute.get_strategy())
    assert again.start_step == 6
    again.run()
    assert again.step == 6
    assert train_lines(tmp_path / "run") == lines  # nothing trained, nothing logged


def test_every_replica_skips_the_step_when_any_replica_overflowed():
    """Keras decides from replica 0's own gradients; replicas that disagree would apply different steps."""

    strategy = cpu_strategy(2)
    with strategy.scope():
        optimizer = precision.LossScaleOptimizer(LARS(0.1))

    @tf.function
    def finite(replica_with_overflow):
        def check():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            gradient = tf.where(tf.equal(replica, replica_with_overflow), np.inf, 1.0) * tf.ones([3])
            return optimizer.check_finite([gradient])
        return strategy.experimental_local_results(strategy.run(check))

    assert [bool(v) for v in finite(tf.constant(1))] == [False, False]
    assert [bool(v) for v in finite(tf.constant(0))] == [False, False]
    assert [bool(v) for v in finite(tf.constant(-1))] == [True, True]

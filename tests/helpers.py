"""What several test files share: the repository's paths, small networks and data, strategies over the logical CPUs,
NumPy references, and the tiny training run (in-process and through `python -m bt_keras.train`).

Test files import from here, never from each other."""

import functools
import itertools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bt_keras import distribute, paths
from bt_keras.method.losses import barlow_twins_loss
from bt_keras.method.model import BarlowTwins
from bt_keras.nets import backbones, heads

# ---------------------------------------------------------------------------------------------------------- paths

REPO = Path(__file__).resolve().parents[1]
# The offline data beside the checkout (../shared/tfds, ../shared/fixtures); BT_KERAS_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("BT_KERAS_SHARED_DIR") or REPO.parent / "shared")
TFDS_DIR = SHARED / "tfds"
TORCHVISION_FIXTURE = SHARED / "fixtures" / "torchvision_resnet50"
SUBPROCESS_SCRIPTS = REPO / "tests" / "subprocess_scripts"  # scripts the tests run in fresh Python processes
QUICKSTART = str(REPO / "experiments" / "quickstart.py")

# ------------------------------------------------------------------------------------------- small models and data


def tiny_model(image_size=8, projector="32-32", lambd=0.0051, seed=0, blocks=(1, 1)):
    """A two-stage, width-1/16 CIFAR ResNet-18 (fast to trace) with a small projector; synchronized BN throughout."""
    import keras

    keras.utils.set_random_seed(seed)
    encoder = backbones.resnet18(
        input_shape=(image_size, image_size, 3), stem="cifar", width_multiplier=1 / 16, blocks=blocks
    )
    return BarlowTwins(encoder, heads.projector(projector), lambd=lambd)


def view_pair(batch, image_size=8, seed=0):
    """Two correlated float32 'views' of random images."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype("float32")
    noise = rng.normal(size=images.shape).astype("float32")
    return images, (images + 0.3 * noise).astype("float32")


def _accelerators() -> list:
    return tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")


# The native CPU kernels (bt_keras.kernels) run only on variables and tensors on the CPU. Where an accelerator is
# visible, the default strategy puts them there and bt_keras runs the TensorFlow-ops path instead (tested on every
# host by tests/train/test_accelerator_path.py), so a test that requires the kernels skips, saying why.
needs_native_kernels = pytest.mark.skipif(
    bool(_accelerators()), reason="needs the native CPU kernels, and variables live on an accelerator here "
                                  "(the TensorFlow-ops path these hosts run is tests/train/test_accelerator_path.py)")


def assert_same_training(label, initial, reference, result, atol=1e-10):
    """Two trainings agree: `reference` and `result` are (losses, gradients, weights); each to `atol`, printed first.
    The reference run must have moved the weights from `initial`, or equality would prove nothing."""
    (loss_1, grads_1, weights_1), (loss_n, grads_n, weights_n) = reference, result
    print(f"{label}: |dloss| {max(abs(a - b) for a, b in zip(loss_1, loss_n)):.1e}, "
          f"|dgrad| {max(np.abs(a - b).max() for a, b in zip(grads_1, grads_n)):.1e}, "
          f"|dweight| {max(np.abs(a - b).max() for a, b in zip(weights_1, weights_n)):.1e}")
    np.testing.assert_allclose(loss_n, loss_1, rtol=0, atol=atol)
    for a, b in zip(grads_n, grads_1):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    for a, b in zip(weights_n, weights_1):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert max(np.abs(a - b).max() for a, b in zip(initial, weights_1)) > 1e-3  # the steps moved the weights


# ------------------------------------------------------------------------------- strategies over the logical CPUs

_GROUP_KEYS = itertools.count(1000, 1000)


def cpu_strategy(replicas, cross_device_ops="collective"):
    """The default strategy for 1 replica, else MirroredStrategy over `replicas` of conftest.py's logical CPUs."""
    if replicas == 1:
        return tf.distribute.get_strategy()  # the default strategy: one device, no replicas
    if cross_device_ops == "one_device":
        strategy = distribute.mirrored([f"/cpu:{i}" for i in range(replicas)], cross_device_ops="auto")
        assert isinstance(strategy.extended._cross_device_ops, tf.distribute.ReductionToOneDevice)  # auto's choice
        return strategy
    # Collective all-reduces (MirroredStrategy's default for in-replica all_reduce) number their groups from 1 in
    # every strategy; a second strategy after a 2-device one in the same process then fails with "joining a group
    # with size 4, but that group has size 2". Give each strategy its own group keys (private TF API, tests only).
    from tensorflow.python.distribute import cross_device_ops, cross_device_utils

    devices = [f"/cpu:{i}" for i in range(replicas)]
    all_reduce = cross_device_ops.CollectiveAllReduce(
        devices=devices,
        group_size=replicas,
        options=tf.distribute.experimental.CommunicationOptions(),
        collective_keys=cross_device_utils.CollectiveKeys(group_key_start=next(_GROUP_KEYS)),
    )
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=all_reduce)


def loss_step_collectives(strategy, batch, dim, read_c=False):
    """The collective ops of a traced loss forward + backward step under `strategy` (benchmarks.collectives)."""
    from benchmarks import collectives

    replicas = strategy.num_replicas_in_sync

    def replica_fn(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            terms = barlow_twins_loss(a, b)
            objective = terms["loss"] / replicas
        grads = tape.gradient(objective, [a, b])
        assert all(g is not None for g in grads)
        return (grads, terms["cross_correlation"]) if read_c else grads

    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((tf.zeros([batch, dim]), tf.zeros([batch, dim]))))
    a, b = next(iter(dataset))
    function = tf.function(lambda a, b: strategy.run(replica_fn, args=(a, b)))
    return collectives.collective_ops(function.get_concrete_function(a, b).graph)


# ------------------------------------------------------------------------------------------------ NumPy references


def numpy_loss(z1, z2, lambd, eps=1e-5):
    """The paper's loss in float64: (C, on-diagonal term, off-diagonal term, loss)."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n = z1.shape[0]
    z1n = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)
    z2n = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
    c = z1n.T @ z2n / n
    on = ((1 - np.diag(c)) ** 2).sum()
    off = (c ** 2).sum() - (np.diag(c) ** 2).sum()
    return c, on, off, on + lambd * off


def numpy_lars(weights, grads_per_step, lr, momentum, eta, wd, bias_lr_scale):
    """The official code's LARS.step, in float64, for a list of arrays over several steps."""
    weights = [np.asarray(w, np.float64).copy() for w in weights]
    mus = [np.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(weights, grads)):
            d = np.asarray(g, np.float64).copy()
            step_lr = lr
            if w.ndim > 1:
                d = d + wd * w
                w_norm, d_norm = np.linalg.norm(w), np.linalg.norm(d)
                d = d * (eta * w_norm / d_norm if (w_norm > 0 and d_norm > 0) else 1.0)
            else:
                step_lr = lr * bias_lr_scale
            mus[i] = momentum * mus[i] + d
            weights[i] = w - step_lr * mus[i]
    return weights


def numpy_solo_lars(params, grads_per_step, lrs, momentum, eta, wd, eps, clip_lr, exclude_bias_n_norm):
    """solo-learn's LARS.step (solo/utils/lars.py, dampening 0, no Nesterov), float64, ported from its formulas.

    Returns the parameters after every step and, per step and parameter, which branch ran: "excluded", "zero-norm",
    "clipped" or "scaled".
    """
    params = [np.asarray(p, np.float64).copy() for p in params]
    buffers = [None] * len(params)
    branches = []
    for lr, grads in zip(lrs, grads_per_step):
        taken = []
        for i, (p, g) in enumerate(zip(params, grads)):
            g = np.asarray(g, np.float64)
            d = g.copy()
            branch = "excluded"
            if p.ndim != 1 or not exclude_bias_n_norm:
                p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
                branch = "zero-norm"
                if p_norm != 0 and g_norm != 0:
                    lars_lr = eta * p_norm / (g_norm + p_norm * wd + eps)
                    branch = "scaled"
                    if clip_lr:
                        branch = "clipped" if lars_lr / lr >= 1 else "scaled"
                        lars_lr = min(lars_lr / lr, 1.0)
                    d = (d + wd * p) * lars_lr
            buffers[i] = d.copy() if buffers[i] is None else momentum * buffers[i] + d  # first step: buf = d
            params[i] = p - lr * buffers[i]
            taken.append(branch)
        branches.append(taken)
    return params, branches


def numpy_topk_accuracy(scores, labels, ks=(1, 5)):
    """(top-k fractions for each k, margin) of class scores [N, classes] in float64: a row is a top-k hit when fewer
    than k classes score above its label's (ties: the lower class index first, as tf.math.top_k). `margin` is the
    smallest gap, over rows and ks, between a row's label score and the k-th highest score of the other classes: the
    one difference that decides that hit. Accuracies from the same scores computed in float32 elsewhere equal these
    exactly when the margin is above their round-off."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).reshape(-1)
    rows = np.arange(len(labels))
    own = scores[rows, labels][:, None]
    classes = np.arange(scores.shape[1])[None, :]
    rank = ((scores > own) | ((scores == own) & (classes < labels[:, None]))).sum(axis=1)
    others = -np.sort(-np.where(classes == labels[:, None], -np.inf, scores), axis=1)[:, :-1]  # descending
    gaps = [np.abs(own[:, 0] - others[:, k - 1]) for k in ks if k <= others.shape[1]]
    margin = float(np.min(gaps)) if gaps else np.inf
    return tuple(float(np.mean(rank < k)) for k in ks), margin


def numpy_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """The weighted kNN votes of Wu et al. 2018 [N, classes], one query at a time, ties broken by index (stable)."""
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    votes = np.zeros([len(test_x), num_classes])
    for row, query in enumerate(test_x):
        similarity = train @ (query / np.linalg.norm(query))
        for i in np.argsort(-similarity, kind="stable")[:k]:
            votes[row, train_y[i]] += np.exp(similarity[i] / temperature)
    return votes


def numpy_knn_topk(votes, labels):
    """Top-1 / top-5 of kNN votes; a class no neighbour voted for is never a hit (it is not predicted)."""
    ranking = np.argsort(-votes, axis=1, kind="stable")
    voted = votes[np.arange(len(labels)), labels] > 0
    return (float(np.mean((ranking[:, 0] == labels) & voted)),
            float(np.mean([y in r[:5] and v for y, r, v in zip(labels, ranking, voted)])))


# ------------------------------------------------------------------------------------------ augmentation statistics

OFF = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output == augmented [0, 1] image


def assert_rate(hits, n, p, sigmas=4.5):
    """`hits` out of `n` is within `sigmas` binomial standard deviations of probability p (exact for 0 and 1)."""
    hits = int(np.sum(hits))
    if p in (0.0, 1.0):
        assert hits == round(p * n), f"{hits}/{n} for p={p}"
    else:
        assert abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n), f"{hits}/{n} for p={p}"


# --------------------------------------------------------------------------------------- commands in subprocesses


@functools.lru_cache(maxsize=1)
def _installed_package() -> Path:
    """Where this Python's installed bt_keras lives (what the console scripts import), asked from outside REPO."""
    done = subprocess.run([sys.executable, "-c", "import bt_keras; print(bt_keras.__file__)"], cwd="/",
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    return Path(done.stdout.strip()).resolve().parent if done.returncode == 0 else Path("/nowhere")


def installed_script(name: str) -> str:
    """The path of the `bt-keras-*` console script `name` that `pip install -e .` put beside this Python: the tests
    that use one run the command as users of an installed bt_keras type it (setup.py's console_scripts). Skips
    where the installed bt_keras is another checkout's (a clone tested with a shared venv): the script would run
    that code, not this checkout's."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is not installed: run `pip install -e .` again (setup.py's console_scripts)"
    if _installed_package() != (REPO / "bt_keras").resolve():
        pytest.skip(f"{name} runs the bt_keras installed at {_installed_package()}, not this checkout's: run "
                    "`pip install -e .` here")
    return path


def run_module(*args, cwd=None, timeout=300):
    """`python -m ARGS` from the repository (PYTHONPATH on it), TensorFlow's C++ logging off."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env,
                          timeout=timeout)


def run_script(name, *args, timeout=300):
    """The installed console script `name` with ARGS (`installed_script`), TensorFlow's C++ logging off."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([installed_script(name), *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


# A line of TensorFlow's C++ logging at INFO or WARNING level ("I0000 00:00:..." / "W1207 ..."): the quiet console of
# bt_keras's commands filters them (bt_keras.cli.console).
CPP_INFO_OR_WARNING = re.compile(r"^[IW]\d{4} ", re.M)


def assert_quiet_console(output: str) -> None:
    """A command's stdout + stderr shows none of TensorFlow's start-up chatter, and says "No GPU found" once."""
    assert not CPP_INFO_OR_WARNING.search(output), CPP_INFO_OR_WARNING.findall(output)[:5]
    assert "retracing" not in output and "absl::InitializeLog" not in output and "cuInit" not in output, output
    assert "is deprecated" not in output, output  # TensorFlow's deprecation notices are for us, not for users
    assert output.count("No GPU found: training on CPU.") == 1


def last_error_line(stderr: str) -> str:
    """The one `ERROR:` line a command line printed, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ the tiny training run: the command and the loop

# The tiny runs draw no picture of C and no report (about 5 CPU-s of matplotlib and a second input pipeline per run);
# the tests that read them ask for them (PICTURES).
TINY = ["--config.backbone=resnet18", "--config.width_multiplier=0.125", "--config.blocks=(1,1)",
        "--config.projector=64-64", "--config.batch_size=32", "--config.knn.every_epochs=0",
        "--config.log_every_steps=2", "--config.picture_every_epochs=0", "--config.report=False"]
PICTURES = ("--config.picture_every_epochs=1", "--config.report=True")  # after TINY: the run's figures drawn


def train_command(workdir, *extra, epochs=2, steps=3):
    """`python -m bt_keras.train` on the quickstart recipe with a tiny network: seconds per run."""
    return [sys.executable, "-m", "bt_keras.train", f"--config={QUICKSTART}", f"--workdir={workdir}",
            f"--config.epochs={epochs}", f"--config.steps_per_epoch={steps}", *TINY, *extra]


def run_cli(args, env=None, timeout=240):
    """Runs a command (a list) from the repository, TensorFlow's C++ INFO lines off."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def tiny_config(**overrides):
    """The quickstart recipe's config with TINY's network, no picture of C and no report: two epochs of three
    steps."""
    sys.path.insert(0, str(REPO / "experiments"))
    import quickstart

    config = quickstart.get_config()
    config.update(dict(backbone="resnet18", width_multiplier=0.125, blocks=(1, 1), projector="64-64", batch_size=32,
                       epochs=2, steps_per_epoch=3, picture_every_epochs=0, report=False))
    config.knn.every_epochs = 0
    config.update(overrides)
    return config


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_local_workers(workdir, count=2, extra=(), **train_args) -> list[subprocess.Popen]:
    """`count` trainers of one multi-worker run on 127.0.0.1 (TF_CONFIG per task), all writing to `workdir`; `extra`:
    more command-line arguments."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(count)]
    processes = []
    for index in range(count):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": tf_config}
        command = train_command(workdir, "--strategy=multi_worker", *extra, **train_args)
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    return processes


def trainer(workdir, allow_config_change=False, **overrides):
    """An in-process Trainer of tiny_config(**overrides) on the default strategy."""
    from bt_keras.train.trainer import Trainer

    return Trainer(tiny_config(**overrides), workdir, tf.distribute.get_strategy(),
                   allow_config_change=allow_config_change)


def resumed_step(workdir, **overrides) -> int:
    """The step a trainer on `workdir` would resume from (it is closed again at once)."""
    t = trainer(workdir, **overrides)
    t.close()
    return t.start_step


def logged_step(workdir) -> int:
    """The last step a run in `workdir` has logged a train line for (-1: none yet); read while the run appends."""
    try:
        lines = (Path(workdir) / paths.METRICS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return -1
    # The last line may be half-written while the run appends it.
    return max((json.loads(line)["step"] for line in lines if '"train"' in line and line.endswith("}")), default=-1)


def wait_for_logged_step(workdir, step: int, processes, timeout: float = 240) -> bool:
    """Waits until `workdir`'s run has logged `step` (or a process ended, or `timeout` s passed); True when every
    process still runs (a test signals them next)."""
    deadline = time.time() + timeout
    while logged_step(workdir) < step and all(p.poll() is None for p in processes) and time.time() < deadline:
        time.sleep(0.02)
    return all(p.poll() is None for p in processes)


def train_lines(workdir):
    """The train and epoch records of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (Path(workdir) / paths.METRICS_FILE).read_text().splitlines()]
    return [line for line in lines if line["kind"] in ("train", "epoch")]


def tree_bytes(folder) -> dict:
    """{relative path: bytes} of every file under folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_a_byte(folder):
    """Damages ckpt-6's data file in `folder` (a checksum error on reading); returns the file's name."""
    data = folder / "ckpt-6.data-00000-of-00001"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    return data.name


def finish_local_workers(processes, final_step: int, timeout: int = 300) -> list[tuple[str, str]]:
    """Waits for `start_local_workers`' processes (killing any left), checks each exited 0 at `final_step`; returns
    their (stdout, stderr)."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        assert f"Finished at step {final_step}" in out
    return outputs

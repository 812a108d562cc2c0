"""tf.data service (`bt_keras.data.service`): a local dispatcher and two workers on 127.0.0.1. Where a test kills a
server or a worker is reached through another address, that one is a subprocess started with the module's own
`--dispatcher` / `--worker` helper; the dispatcher and the other worker of those clusters are servers in this process
(the same configs). Every one is stopped in `finally`; every wait is bounded.

What is proven: a training run through the service trains and both workers delivered batches (counted at the consumer
from per-worker tags); an unreachable dispatcher is a one-line error naming the address within 30 s (in-process, from
the trainer, and through `python -m bt_keras.train` for a port that is no dispatcher); SIGKILLing a worker mid-run
does not stop training, and the stall it causes is measured and printed; a dispatcher (and its worker) killed mid-run
ends `python -m bt_keras.train` with exit code 4 and one line.
"""

import os
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import augment, data
from bt_keras.data import service as data_service
from bt_keras.train.trainer import Trainer
from tests.helpers import QUICKSTART, REPO, TINY, run_cli, tiny_config

START_TIMEOUT = 120  # s, for a subprocess to import TensorFlow and start its server on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_line(proc, timeout):
    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or "ready" not in line[0]:
        raise RuntimeError(f"server {proc.args} did not start within {timeout} s: {line}")
    return line[0]


class _Forwarder:
    """A TCP port that relays every connection to `target_port`: what a worker behind a NAT or a port mapping looks
    like. `connections` counts what came through, so a test sees whether a client used this address."""

    def __init__(self, target_port: int):
        self.target_port, self.connections = target_port, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                return  # closed
            server.settimeout(None)
            self.connections += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        """Copies one direction; at its end, half-closes `sink` (the other direction goes on until it ends too)."""
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for end in (source, sink):  # a reset: both directions are over
                end.close()

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (close alone does not, on Linux)
        except OSError:
            pass
        self.listener.close()


class Cluster:
    """A dispatcher and `workers` workers; `close()` stops every one of them. By default all are subprocesses of the
    module's own `--dispatcher` / `--worker` helpers, killed by `close()`. With `local=True` the dispatcher and the
    first worker are servers in this process (the same configs; a test that kills a process needs only that one to
    be a process, and each process costs a TensorFlow start-up). With `forwarded`, the last worker is started with
    `--worker_address` naming a `_Forwarder` to its port (`self.forwarder`): trainers reach it only if the dispatcher
    hands out that address."""

    def __init__(self, workers=2, forwarded=False, local=False):
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.port = _free_port()
        self.address = f"grpc://127.0.0.1:{self.port}"
        self.procs, self.servers, self.forwarder = [], [], None
        service = tf.data.experimental.service
        try:
            if local:
                self.servers.append(service.DispatchServer(service.DispatcherConfig(port=self.port,
                                                                                    worker_timeout_ms=2000)))
            else:
                self.procs.append(self._start(["--dispatcher", f"--port={self.port}", "--worker_timeout_ms=2000"],
                                              env))
            ports = [_free_port() for _ in range(workers)]
            addresses = [[] for _ in ports]
            if forwarded:
                self.forwarder = _Forwarder(ports[-1])
                addresses[-1] = [f"--worker_address=127.0.0.1:{self.forwarder.port}"]
            self.workers = []
            for index, (port, address) in enumerate(zip(ports, addresses)):
                if local and index == 0:
                    self.servers.append(service.WorkerServer(service.WorkerConfig(
                        dispatcher_address=f"127.0.0.1:{self.port}", port=port, worker_address=f"localhost:{port}",
                        heartbeat_interval_ms=500)))
                    self.workers.append(None)  # not a process
                else:
                    self.workers.append(self._start(["--worker", f"--dispatcher_address=127.0.0.1:{self.port}",
                                                     f"--port={port}", "--heartbeat_ms=500", *address], env))
            self.ready_lines = [_read_line(proc, START_TIMEOUT) for proc in self.procs]
        except BaseException:
            self.close()
            raise

    def _start(self, args, env):
        proc = subprocess.Popen([sys.executable, "-m", "bt_keras.data_service", *args], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc) if args[0] == "--worker" else None
        return proc

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=30)
        # The worker, then the dispatcher. Bounded: TensorFlow's stop can take tens of seconds (measured up to 51 s in
        # a loaded run); after 30 s a server is left to the process's exit rather than blocking the suite.
        for server in reversed(self.servers):
            stopper = threading.Thread(target=server.stop, daemon=True)
            stopper.start()
            stopper.join(30)
        self.servers = []
        if self.forwarder:
            self.forwarder.close()


@pytest.fixture
def cluster():
    """A dispatcher and two workers of this test's own (it kills the second, a process)."""
    c = Cluster(local=True)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def shared_cluster():
    """A dispatcher and two workers shared by the tests that only read from them (each its own job); the second, a
    process of the module's `--worker` helper, is reached through `--worker_address` (a forwarded port), as a worker
    on another machine would be."""
    c = Cluster(forwarded=True, local=True)
    try:
        yield c
    finally:
        c.close()


class _StepTimes(keras.callbacks.Callback):
    """Wall time at the end of every step; SIGKILLs one of `workers` at the first step >= `kill_after` at which both
    workers have delivered batches (so the one killed was serving), and records the per-worker counts then."""

    def __init__(self, workers=(), kill_after=None, served=lambda: {}):
        super().__init__()
        self.times, self.workers, self.kill_after, self.served = [], workers, kill_after, served
        self.killed_step, self.served_at_kill = None, None

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())
        if self.killed_step is None and len(self.served()) < 2 and len(self.times) < 200:
            time.sleep(0.2)  # as slow as a real step until the second worker has delivered (see _SlowSteps)
        if (self.workers and self.killed_step is None and len(self.times) >= self.kill_after
                and len(self.served()) == 2):
            self.workers[1].kill()
            self.killed_step, self.served_at_kill = len(self.times), self.served()


class _SlowSteps(keras.callbacks.Callback):
    def __init__(self, served, budget=60.0):
        super().__init__()
        self.served, self.deadline = served, time.monotonic() + budget

    def on_train_batch_end(self, batch, logs=None):
        wait_until = min(self.deadline, time.monotonic() + 3.0)  # at most 3 s a step, 60 s in all
        while len(self.served()) < 2 and time.monotonic() < wait_until:
            time.sleep(0.1)


@pytest.mark.slow
def test_training_through_the_service_uses_both_workers(shared_cluster, tmp_path):
    cluster = shared_cluster
    # 32 steps: the client buffers the first worker's early batches, so the second's arrive after those.
    config = tiny_config(data_service=cluster.address, augment_on="accelerator", epochs=4, steps_per_epoch=8)
    trainer = Trainer(config, tmp_path / "run", tf.distribute.get_strategy())
    # The tiny model steps in ~40 ms; a real step is slower. Until the second worker (which starts a new epoch) has
    # delivered, each step waits up to 3 s (at most 60 s in all), as the workers would see under a real model.
    logs = trainer.run([_SlowSteps(lambda: data_service.served(trainer.served_key))])
    served = data_service.served(trainer.served_key)
    print("batches served per worker:", served)
    assert trainer.step == 32 and np.isfinite(logs["loss"])
    assert len(served) == 2 and min(served.values()) >= 1, served  # both workers delivered batches
    assert sum(served.values()) >= 32


@pytest.mark.slow
def test_workers_batches_have_distinct_seeds(shared_cluster):
    """Each worker counts its batches from 0; with epoch_keyed (what the trainer uses with the service) the epoch is
    folded into the seeds, so no two batches from different workers share augmentation draws."""
    local = data.pretrain_dataset("digits", global_batch_size=64, seed=0, views=augment.cifar_views(32),
                                  augment_on="accelerator", epoch_keyed=True)
    remote = data_service.distribute(local, shared_cluster.address)
    seeds, deadline = [], time.monotonic() + 60
    for batch in remote.take(60):
        seeds.append(tuple(batch["view1_params"]["hue"].numpy()))
        if len(data_service.served(remote.served_key)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # a consumer as slow as a real training step, so the second worker gets to deliver
    served = data_service.served(remote.served_key)
    assert len(served) == 2, served
    assert len(set(seeds)) == len(seeds), "two batches got the same augmentation seed"


@pytest.mark.slow
def test_a_worker_is_reached_at_its_worker_address(shared_cluster):
    """`--worker_address` is what the dispatcher hands trainers: a trainer's connection to the second worker came
    through the forwarded port it names (with the flag ignored, trainers would dial the worker's own port and the
    forwarder would see no connection), and its ready line says where it is reached."""
    forwarder = shared_cluster.forwarder
    assert f"reached at 127.0.0.1:{forwarder.port}," in shared_cluster.ready_lines[-1], shared_cluster.ready_lines
    remote = data_service.distribute(tf.data.Dataset.range(1000).batch(10), shared_cluster.address)
    deadline = time.monotonic() + 60
    for _ in remote:
        if forwarder.connections or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert forwarder.connections >= 1, "no trainer connection came through the address given by --worker_address"


def test_epoch_keyed_streams_are_seeded_and_distinct_per_epoch():
    images = tf.data.Dataset.from_tensor_slices(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), np.uint8))

    def seeds(**kwargs):
        ds = data.pair_batches(images, batch_size=8, views=augment.cifar_views(8), seed=3, augment_on="accelerator",
                               **kwargs)
        return [tuple(b["view1_params"]["hue"].numpy()) for b in ds.take(6)]

    keyed = seeds(epoch_keyed=True)
    assert keyed == seeds(epoch_keyed=True) and len(set(keyed)) == 6  # reproducible locally, all distinct
    assert keyed != seeds()  # a different stream from the default one


@pytest.mark.hostile
@pytest.mark.slow
def test_a_worker_killed_mid_run_does_not_stop_training(cluster, tmp_path):
    config = tiny_config(data_service=cluster.address, epochs=4, steps_per_epoch=8)
    trainer = Trainer(config, tmp_path / "run", tf.distribute.get_strategy())
    times = _StepTimes(cluster.workers, kill_after=6, served=lambda: data_service.served(trainer.served_key))
    result = {}
    runner = threading.Thread(target=lambda: result.update(logs=trainer.run([times])), daemon=True)
    runner.start()
    runner.join(300)  # bounded: a hang fails the test instead of blocking the suite
    assert not runner.is_alive(), f"training stalled after the worker was killed ({len(times.times)} steps done)"
    assert times.killed_step is not None, f"the second worker never served a batch: {times.served()}"
    assert cluster.workers[1].poll() is not None  # it really died
    assert trainer.step == 32 and np.isfinite(result["logs"]["loss"])
    served = data_service.served(trainer.served_key)
    grown = {tag: served[tag] - times.served_at_kill.get(tag, 0) for tag in served}
    # Every step after the kill took one batch; the killed worker's count grows only by what it had already sent
    # (the client's prefetched requests: 7 of 26 once under CI load), the live worker serves the rest.
    dead, live = sorted(grown.values())
    assert dead + live >= 32 - times.killed_step and live > dead, grown  # (prefetched batches count too)
    after = np.diff(times.times)[times.killed_step - 1:]  # the steps after the kill
    print(f"killed a serving worker after step {times.killed_step}: the {len(after)} steps after it took "
          f"{np.median(after):.3f} s (median), the longest {after.max():.3f} s "
          f"(stall {after.max() - np.median(after):.3f} s); batches per worker at the kill {times.served_at_kill}, "
          f"at the end {served}")
    assert after.max() < 30  # a stall, if any, is bounded


@pytest.mark.slow
@pytest.mark.hostile
def test_unreachable_dispatcher_is_a_clear_error_within_30_s():
    address = f"grpc://127.0.0.1:{_free_port()}"  # nothing listens there
    dataset = data.pair_batches(tf.data.Dataset.from_tensor_slices(
        np.zeros((8, 8, 8, 3), np.uint8)), batch_size=4, views=augment.cifar_views(8), seed=0)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=address.replace(".", r"\.")):
        data_service.distribute(dataset, address, probe_timeout=5)
    assert time.monotonic() - start < 30
    for bad in ("127.0.0.1:5050", "grpc://host", "grpc://host:0", "http://host:1"):
        with pytest.raises(ValueError, match="expected grpc://HOST:PORT"):
            data_service.parse_address(bad)


class _Listener:
    """Something that is no dispatcher on a local port: an HTTP server, or a socket that accepts and says nothing."""

    def __init__(self, kind: str):
        import http.server

        if kind == "http":
            self.server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
            self.server.RequestHandlerClass.log_message = lambda *args: None
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
            self.port = self.server.server_address[1]
        else:
            self.server = None
            self.socket = socket.socket()
            self.socket.bind(("127.0.0.1", 0))
            self.socket.listen()
            self.port = self.socket.getsockname()[1]

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        else:
            self.socket.close()


@pytest.mark.slow
@pytest.mark.hostile
@pytest.mark.parametrize("kind", ["http", "silent"])
def test_a_port_that_is_no_dispatcher_is_a_clear_error_not_a_hang(kind):
    """An HTTP server on the port hung the trainer with no message (killed after 120 s): the address must answer the
    dispatcher's own GetVersion call."""
    listener = _Listener(kind)
    try:
        address = f"grpc://127.0.0.1:{listener.port}"
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="does not answer as a tf.data service dispatcher") as raised:
            data_service.check_reachable(address, timeout=5)
        assert address in str(raised.value) and "\n" not in str(raised.value)
        assert time.monotonic() - start < 15
    finally:
        listener.close()
    dispatcher = tf.data.experimental.service.DispatchServer(tf.data.experimental.service.DispatcherConfig(port=0))
    data_service.check_reachable(dispatcher.target, timeout=5)  # a real dispatcher passes
    dispatcher.stop()


@pytest.mark.hostile
@pytest.mark.slow
def test_unreachable_dispatcher_through_the_trainer(tmp_path):
    """The trainer probes `config.data_service` before it builds or writes anything: a ConnectionError naming the
    address after its 10 s probe, no workdir left. In-process: the command turns that ConnectionError into its one
    `ERROR:` line and exit code 2 by the same handler the HTTP-server case below runs as a process."""
    address = f"grpc://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"tf.data service dispatcher {address.replace('.', '[.]')} cannot be "
                                              "reached"):
        Trainer(tiny_config(data_service=address), tmp_path / "run", tf.distribute.get_strategy())
    elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed  # the probe alone is bounded by 10 s
    assert not (tmp_path / "run").exists()


@pytest.mark.hostile
@pytest.mark.slow
def test_an_http_server_as_dispatcher_through_the_cli_is_one_line_and_leaves_no_lock(tmp_path):
    listener = _Listener("http")
    try:
        address = f"grpc://127.0.0.1:{listener.port}"
        result = run_cli([sys.executable, "-m", "bt_keras.train", f"--config={QUICKSTART}",
                          f"--workdir={tmp_path / 'run'}", f"--data_service={address}", *TINY], timeout=120)
    finally:
        listener.close()
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and f"{address} does not answer as a tf.data service dispatcher" in errors[0], errors
    assert not (tmp_path / "run" / "train.lock").exists() and "Traceback" not in result.stderr


@pytest.mark.hostile
@pytest.mark.slow
def test_a_dispatcher_that_dies_mid_run_ends_it_with_one_line_naming_it_and_no_lock(tmp_path):
    """TensorFlow retries a dead dispatcher forever inside the step; the trainer's watchdog ends the run within the
    stall deadline (config.data_service_stall_s) with one line naming the address and exit code 4, the workdir lock
    released and the last checkpoint whole. The dispatcher's host goes down: dispatcher and worker are killed."""
    from bt_keras import checkpoints, paths

    cluster = Cluster(workers=1)
    workdir = tmp_path / "run"
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "bt_keras.train", f"--config={QUICKSTART}", f"--workdir={workdir}",
             f"--data_service={cluster.address}", *TINY, "--config.epochs=50", "--config.steps_per_epoch=4",
             "--config.log_every_steps=1", "--config.data_service_stall_s=5"],
            cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        deadline = time.monotonic() + START_TIMEOUT
        metrics = workdir / paths.METRICS_FILE
        while (not metrics.exists() or '"train"' not in metrics.read_text()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.1)
        assert metrics.exists(), "no step was logged in time"
        cluster.close()  # dispatcher and worker die mid-run
        killed = time.monotonic()
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("the run still hangs 60 s after its dispatcher died")
    finally:
        cluster.close()
    assert time.monotonic() - killed < 60
    assert process.returncode == 4, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and f"dispatcher {cluster.address} stopped answering" in errors[0], stderr[-3000:]
    assert not (workdir / paths.LOCK_FILE).exists()
    latest = paths.latest_checkpoints(workdir)[-1]
    checkpoints.verify(latest)  # whole: every value reads back

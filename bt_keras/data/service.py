"""tf.data service: run the pre-training input pipeline on other machines' cores (TensorFlow's disaggregated tf.data).

When one host's cores cannot feed the accelerators (ImageNet at 224 px needs ~10 cores per GPU with host-side
augmentation), start a dispatcher and workers, anywhere the training host can reach over TCP::

    python -m bt_keras.data_service --dispatcher --port=5050
    python -m bt_keras.data_service --worker --dispatcher_address=HOST:5050 --port=5051    # one per machine / core set
    python -m bt_keras.train --config=experiments/... --workdir=runs/x --data_service=grpc://HOST:5050

(or `config.data_service = "grpc://HOST:5050"`). The trainer builds its pipeline as usual (`data.pretrain_dataset`) and
`distribute` sends the pipeline's graph to the dispatcher; the workers run it and stream batches back. Workers need the
same TensorFlow version and read the data themselves: TFDS `data_dir`s and `folder:` paths must exist on the workers
under the same path. Use `config.augment_on = "accelerator"` with it: workers then send uint8 crops, 4x fewer bytes.

Processing mode: "distributed_epoch". The pipeline's first source is `Dataset.range(epochs)` (`data.pair_batches`),
so the dispatcher hands out one epoch index at a time: each epoch (one seeded shuffle of the data) is processed by
exactly one worker, each worker's batches are distinct, and a worker that joins later just takes the next epoch.
"parallel_epochs" would run the same seeded pipeline on every worker and so deliver every batch once per worker.

Resume guarantees in this mode (weaker than local reading, where the stream is a pure function of (seed, step)):

* What a resume restores is exactly what it restores locally: the model, the optimizer (moments, step counter, so the
  learning-rate schedule) and the step, from the latest checkpoint.
* The data stream is NOT reproduced: batches arrive in whatever order the workers finish them (several workers'
  epochs are interleaved, and which worker gets which epoch depends on timing). Each worker counts its batches from
  0, so the trainer folds the epoch into every augmentation seed (`pair_batches(epoch_keyed=True)`): each batch is
  a valid pair of views of `batch_size` distinct images of one epoch, with seeds no other batch shares (tested).
  But neither an uninterrupted run nor a resumed one can be replayed bit-exactly, and a resumed run does not
  restart at the exact batch: the trainer's `start_batch` becomes each worker's offset into its own stream.
* A worker that dies loses the batches it had prepared and the rest of its current epoch (the dispatcher does not
  reassign a split that was handed out); training continues on the other workers (measured in
  tests/data/test_service.py: a 0.1-0.2 s stall at one step on this machine). A dispatcher that dies stops the run (its state is not
  fault-tolerant here unless started with --work_dir and --fault_tolerant): TensorFlow would retry it forever inside
  the step, so the trainer's watchdog (`bt_keras.train.watchdog`) ends the run once a step has waited
  `config.data_service_stall_s` seconds and the dispatcher no longer answers: one line naming it, exit code 4.

An unreachable dispatcher is an error within `probe_timeout` seconds naming the address (TensorFlow itself would retry
forever): `check_reachable` opens a TCP connection first.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

PROCESSING_MODE = "distributed_epoch"
_FORM = "grpc://HOST:PORT (e.g. grpc://10.0.0.2:5050)"
_GET_VERSION = "/tensorflow.data.DispatcherService/GetVersion"  # tensorflow/core/data/service/dispatcher.proto

# Elements served per worker, counted at the consumer: {job key: Counter(worker tag -> batches)}; see `served`.
_SERVED: dict[str, Counter] = {}
_LOCK = threading.Lock()


def parse_address(address: str) -> tuple[str, int]:
    """'grpc://HOST:PORT' -> (HOST, PORT); a one-line error naming the expected form otherwise."""
    if not isinstance(address, str) or not address.startswith("grpc://"):
        raise ValueError(f"data_service={address!r}: expected {_FORM}")
    host, sep, port = address[len("grpc://"):].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"data_service={address!r}: expected {_FORM}")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Raises ConnectionError within about `timeout` seconds unless a tf.data service dispatcher answers at `address`.

    First a TCP connection (retried, so a dispatcher that is still starting is waited for), then one call of the
    dispatcher's own gRPC method `GetVersion`: a port where something else listens (an HTTP server, a worker's port,
    a process that accepts and says nothing) would otherwise leave the trainer waiting for its first batch forever.
    """
    host, port = parse_address(address)
    deadline, error = time.monotonic() + timeout, None
    start_one = (f"start one with `python -m bt_keras.data_service --dispatcher --port={port}` on {host}, or fix "
                 "--data_service / config.data_service.")
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                break
        except OSError as e:
            error = e
        if time.monotonic() >= deadline:
            raise ConnectionError(f"tf.data service dispatcher {address} cannot be reached "
                                  f"({error.__class__.__name__}: {error}) after {timeout:.0f} s; {start_one}")
        time.sleep(0.2)
    problem = _dispatcher_problem(host, port, max(1.0, deadline - time.monotonic()))
    if problem:
        raise ConnectionError(f"{address} does not answer as a tf.data service dispatcher ({problem}); {start_one}")


def dispatcher_problem(address: str, timeout: float = 5.0) -> str | None:
    """None while the dispatcher at `address` ('grpc://HOST:PORT') answers its GetVersion call within `timeout`
    seconds, else what went wrong, on one line: the trainer's watchdog asks this of a run whose step is stalled."""
    host, port = parse_address(address)
    return _dispatcher_problem(host, port, timeout)


def _dispatcher_problem(host: str, port: int, timeout: float) -> str | None:
    """None if `DispatcherService/GetVersion` answers at host:port (an empty request is a valid GetVersionRequest),
    else what went wrong, on one line."""
    import grpc  # a dependency of TensorFlow

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        get_version = channel.unary_unary(_GET_VERSION, request_serializer=None, response_deserializer=None)
        try:
            get_version(b"", timeout=timeout)
        except grpc.RpcError as error:
            return f"{error.code().name}: {' '.join(str(error.details()).split())[:160]}"
    return None


def served(key: str | None = None) -> dict:
    """Batches delivered per worker so far (worker tags are random per-worker ids), for the job `key` that
    `distribute` returned in `dataset.served_key`, or all jobs when None."""
    with _LOCK:
        if key is None:
            return {k: dict(v) for k, v in _SERVED.items()}
        return dict(_SERVED.get(key, {}))


def _tag_with_worker(dataset):
    """Each element -> (element, worker id): a random int64 drawn once per iterator, i.e. once per worker task
    (a stateless per-process draw: RandomUniformInt with seed 0/0 is seeded from the OS per kernel instance)."""
    import tensorflow as tf

    def tag(state, element):
        fresh = tf.raw_ops.RandomUniformInt(shape=tf.constant([], tf.int32), minval=tf.constant(1, tf.int64),
                                            maxval=tf.constant(2**62, tf.int64), seed=0, seed2=0)
        state = tf.where(state == 0, fresh, state)
        return state, (element, state)

    return dataset.scan(tf.constant(0, tf.int64), tag)


def distribute(dataset, address: str, *, job_name: str | None = None, processing_mode: str = PROCESSING_MODE,
               probe_timeout: float = 10.0, count: bool = True):
    """`dataset`, processed by the tf.data service at `address` ('grpc://HOST:PORT'); see the module docstring.

    Checks that the dispatcher is reachable first (ConnectionError naming it within `probe_timeout` s). With `count`,
    the workers tag each element with their id and the consumer counts them (`served(dataset.served_key)`): one
    small Python call per batch on the training host.
    """
    import tensorflow as tf

    check_reachable(address, probe_timeout)
    key = f"{job_name or 'anonymous'}-{id(dataset)}-{time.monotonic_ns()}"
    source = _tag_with_worker(dataset) if count else dataset
    remote = source.apply(tf.data.experimental.service.distribute(
        processing_mode=processing_mode, service=address, job_name=job_name))
    if count:
        with _LOCK:
            _SERVED[key] = Counter()

        def record(worker):
            with _LOCK:
                _SERVED[key][int(worker)] += 1
            return worker

        def strip(element, worker):
            with tf.control_dependencies([tf.py_function(record, [worker], tf.int64)]):
                return tf.nest.map_structure(tf.identity, element)

        remote = remote.map(strip)
    remote.served_key = key
    return remote

"""`python -m bt_keras.data_service --dispatcher | --worker`: a tf.data service dispatcher or worker for the
pre-training pipeline (the library half, and how the trainer uses it: `bt_keras.data.service`)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bt_keras.data_service", description=__doc__.split("\n\n")[0])
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--dispatcher", action="store_true", help="run a dispatcher")
    role.add_argument("--worker", action="store_true", help="run a worker")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--dispatcher_address", help="HOST:PORT of the dispatcher (--worker)")
    parser.add_argument("--worker_address", help="HOST:PORT the dispatcher and trainers reach this worker at "
                        "(default localhost:PORT; set it to this machine's name when they run elsewhere)")
    parser.add_argument("--heartbeat_ms", type=int, default=1000, help="worker heartbeat interval (--worker)")
    parser.add_argument("--worker_timeout_ms", type=int, default=5000,
                        help="a worker silent this long is removed (--dispatcher)")
    parser.add_argument("--work_dir", help="dispatcher journal directory (--dispatcher, with --fault_tolerant)")
    parser.add_argument("--fault_tolerant", action="store_true", help="journal the dispatcher's state (--dispatcher)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    service = tf.data.experimental.service
    if args.dispatcher:
        if args.fault_tolerant and not args.work_dir:
            parser.error("--fault_tolerant needs --work_dir")
        server = service.DispatchServer(service.DispatcherConfig(
            port=args.port, work_dir=args.work_dir, fault_tolerant_mode=args.fault_tolerant,
            worker_timeout_ms=args.worker_timeout_ms))
        print(f"bt_keras.data_service: dispatcher ready at {server.target}", flush=True)
    else:
        if not args.dispatcher_address:
            parser.error("--worker needs --dispatcher_address=HOST:PORT")
        address = args.worker_address or f"localhost:{args.port}"
        server = service.WorkerServer(service.WorkerConfig(
            dispatcher_address=args.dispatcher_address.removeprefix("grpc://"), port=args.port,
            worker_address=address, heartbeat_interval_ms=args.heartbeat_ms))
        print(f"bt_keras.data_service: worker ready on port {args.port}, reached at {address}, for dispatcher "
              f"{args.dispatcher_address}", flush=True)
    server.join()
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

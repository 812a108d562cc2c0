"""Embeds image files with a bt_keras model served by TF Serving (the library: `bt_keras.serving.client`).

    python -m export.client --rest=http://localhost:8501 --model=bt_keras cat.jpg dog.png
    python -m export.client --grpc=localhost:8500 --model=bt_keras cat.jpg      # needs tensorflow-serving-api

prints one JSON object per image, `{"image": path, "embedding": [...]}` (plus `"projection"` when served).
A failure is one `ERROR: ...` line on stderr naming the thing and the fix; exit code 2 for a usage error or a
server not reached (missing / unreadable / directory image paths, a malformed --rest URL, a refused connection),
1 when the server answered with an error (a bad image, an unknown model). Loads no TensorFlow for REST.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse

from bt_keras.serving.client import predict_grpc, predict_rest, ServingError


class UsageError(ValueError):
    """A bad command line: a missing or unreadable image file, a malformed server address."""


def read_image_files(paths) -> list[bytes]:
    """The bytes of each file, or UsageError naming the path and the fix (missing, a directory, unreadable)."""
    data = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data.append(f.read())
        except FileNotFoundError:
            raise UsageError(f"image file {path!r} does not exist; pass the paths of encoded image files "
                             "(JPEG, PNG, GIF, BMP, WebP)") from None
        except IsADirectoryError:
            raise UsageError(f"{path!r} is a directory, not an image file; pass the image files in it, e.g. "
                             f"{os.path.join(path, '*.jpg')}") from None
        except OSError as error:
            raise UsageError(f"cannot read image file {path!r}: {error.strerror or error}; check the path and its "
                             "permissions") from None
    return data


def check_rest_url(server: str) -> str:
    """`server` if it is an http(s)://host[:port] URL, else UsageError with an example."""
    example = "pass the REST address of tensorflow_model_server, e.g. --rest=http://localhost:8501"
    try:
        parts = urllib.parse.urlsplit(server)
        parts.port  # raises ValueError for a port that is no number
    except ValueError:
        raise UsageError(f"--rest {server!r} is not a valid URL; {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--rest {server!r} is not an http:// or https:// URL with a host; {example}")
    return server


def _one_line(error) -> str:
    return " ".join(str(error).split())


def main(argv=None) -> int:
    """The CLI. Exit codes: 0 success; 2 a usage error or no server reached (a missing, unreadable or directory
    image path, a malformed --rest URL, a refused or timed-out connection, gRPC without its package); 1 the server
    answered with an error (a bad image, an unknown model or signature). Every failure is one `ERROR: ...` line
    on stderr naming the thing and the fix."""
    import argparse

    parser = argparse.ArgumentParser(description="Embed image files with a bt_keras model served by TF Serving.")
    parser.add_argument("images", nargs="+", help="encoded image files (JPEG, PNG, GIF, BMP, WebP)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--rest", help="REST server, e.g. http://localhost:8501")
    where.add_argument("--grpc", help="gRPC target, e.g. localhost:8500 (needs tensorflow-serving-api)")
    parser.add_argument("--model", default="bt_keras", help="TF Serving model name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the latest)")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        data = read_image_files(args.images)
        if args.rest:
            outputs = predict_rest(check_rest_url(args.rest), args.model, data, version=args.version,
                                   timeout=args.timeout)
        else:
            outputs = {k: v.tolist() for k, v in predict_grpc(args.grpc, args.model, data, version=args.version,
                                                               timeout=args.timeout).items()}
    except (UsageError, ConnectionError, ImportError) as error:
        print(f"ERROR: {_one_line(error)}", file=sys.stderr)
        return 2
    except ServingError as error:
        print(f"ERROR: {_one_line(error)}", file=sys.stderr)
        return 1
    for i, path in enumerate(args.images):
        print(json.dumps({"image": path, **{name: values[i] for name, values in outputs.items()}}))
    return 0


def run():
    """Console entry point (`bt-keras-client`)."""
    raise SystemExit(main())


if __name__ == "__main__":
    run()

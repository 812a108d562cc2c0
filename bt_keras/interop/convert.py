"""A torchvision ResNet checkpoint (PyTorch, e.g. the official Barlow Twins ResNet-50) converted into an encoder
folder (`encoder.keras` + `encoder.json`, what a training workdir ends with). The command line is
`python -m bt_keras.convert` (`bt_keras.cli.convert`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bt_keras import paths, views
from bt_keras.assembly import artifacts
from bt_keras.interop import torch_file, torchvision_resnet

DEFAULTS = {  # stem -> preprocessing recorded when not overridden
    "imagenet": {"image_size": 224, "mean": views.IMAGENET_MEAN, "std": views.IMAGENET_STD},
    "cifar": {"image_size": 32, "mean": views.CIFAR10_MEAN, "std": views.CIFAR10_STD},
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_torchvision_checkpoint(torch_checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                                   backbone: str | None = None, stem: str | None = None,
                                   cifar_stem_padding: int = 1, prefix: str | None = None, ignore=(),
                                   image_size: int | None = None, mean=None, std=None,
                                   overwrite: bool = False) -> tuple[Path, dict]:
    """Reads a torchvision ResNet `torch.save` file, builds the matching encoder and saves it into `output`.

    Options as `torchvision_resnet.build_encoder`; `image_size`, `mean`, `std` default by stem (see DEFAULTS).
    Returns `(path of encoder.keras, the metadata written to encoder.json)`. Raises FileNotFoundError,
    FileExistsError (an encoder already in `output` and not `overwrite`), torch_file.TorchFileError or
    torchvision_resnet.ConversionError (both ValueErrors), each with a one-line message.
    """
    source, output = Path(torch_checkpoint), Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file: --output must be a folder (it receives "
                              f"{paths.ENCODER_FILE} and its JSON); pass a new or existing folder's path.")
    if (output / paths.ENCODER_FILE).exists() and not overwrite:
        raise FileExistsError(f"{output / paths.ENCODER_FILE} exists already; pass --overwrite to replace "
                              "it, or choose another --output.")
    state = torch_file.load_state_dict(source)
    encoder, report = torchvision_resnet.build_encoder(state, backbone, stem, cifar_stem_padding=cifar_stem_padding,
                                                       prefix=prefix, ignore=tuple(ignore))
    prep = DEFAULTS[report["stem"]]
    image_size = int(prep["image_size"] if image_size is None else image_size)  # 0 is refused below, not defaulted
    mean = [float(v) for v in (mean or prep["mean"])]
    std = [float(v) for v in (std or prep["std"])]
    if image_size < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"Bad preprocessing: image_size={image_size}, mean={mean}, std={std} (want a positive size "
                         "and 3 per-channel values, std > 0).")
    metadata = {
        "backbone": report["backbone"], "stem": report["stem"], "image_size": image_size, "mean": mean, "std": std,
        "converted_from": {
            "format": "torchvision ResNet state dict (torch.save)", "file": str(source.resolve()),
            "sha256": _sha256(source), **{k: report[k] for k in ("prefix", "cifar_stem_padding", "keys_used",
                                                                  "source_dtypes", "ignored")},
            "left_out": len(report["left_out"]),
        },
    }
    path = artifacts.save_encoder(encoder, output, metadata)  # the one place the encoder format is written
    return path, {**metadata, "feature_dim": int(encoder.output_shape[-1])}

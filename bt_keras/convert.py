"""Converts a torchvision ResNet checkpoint (PyTorch, e.g. the official Barlow Twins ResNet-50) into an encoder folder.

    python -m bt_keras.convert --torch_checkpoint=resnet50.pth --output=models/barlowtwins_r50 \
        [--backbone=resnet50] [--stem=imagenet|cifar] [--cifar_stem_padding=1|2] [--prefix=backbone.] \
        [--ignore_keys=fc] [--image_size=224] [--mean=...] [--std=...] [--overwrite]

writes `OUTPUT/encoder.keras` + `OUTPUT/encoder.json`, the files a training workdir ends with, so every other tool
takes OUTPUT as it takes a workdir (`python -m bt_keras.evaluate.knn --encoder=OUTPUT ...`,
`python -m export.savedmodel --checkpoint=OUTPUT ...`, `python -m export.onnx --checkpoint=OUTPUT ...`).

Neither PyTorch nor anything the file's pickle names is imported or run (`bt_keras.interop.torch_file`); depth and
stem are read from the keys and shapes unless given (`bt_keras.interop.torchvision_resnet`). Preprocessing recorded
in encoder.json: image_size 224 with the ImageNet stem, 32 with the CIFAR stem; mean/std ImageNet's with the
ImageNet stem, CIFAR-10's with the CIFAR stem (solo-learn's and our CIFAR recipes); each overridable.

Errors (a missing file, a forbidden pickled global, a key set or shape that does not fit) are printed as one line
`ERROR: ...` and exit with status 2.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bt_keras import artifacts, views
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
                              f"{artifacts.ENCODER_FILE} and its JSON); pass a new or existing folder's path.")
    if (output / artifacts.ENCODER_FILE).exists() and not overwrite:
        raise FileExistsError(f"{output / artifacts.ENCODER_FILE} exists already; pass --overwrite to replace "
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


def _summary(metadata: dict, path: Path) -> str:
    source = metadata["converted_from"]
    left = f", {source['left_out']} keys outside {source['prefix']!r} left out" if source["left_out"] else ""
    return (f"Converted {source['file']} ({source['keys_used']} tensors, {'/'.join(source['source_dtypes'])}"
            f"{left}) into {path}: {metadata['backbone']}, {metadata['stem']} stem, {metadata['feature_dim']}-d "
            f"features; preprocessing image_size={metadata['image_size']} mean={metadata['mean']} "
            f"std={metadata['std']}.")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("torch_checkpoint", None, "A torch.save file of a torchvision ResNet state dict (.pth).")
    flags.DEFINE_string("output", None, "Folder to write encoder.keras and encoder.json into.")
    flags.DEFINE_enum("backbone", None, sorted(torchvision_resnet.ARCHITECTURES),
                      "The architecture (default: read from the keys).")
    flags.DEFINE_enum("stem", None, list(torchvision_resnet.STEMS), "The stem (default: from conv1's kernel size).")
    flags.DEFINE_integer("cifar_stem_padding", 1, "CIFAR stem conv1 padding: 1 (torchvision style) or 2 (solo-learn).")
    flags.DEFINE_string("prefix", None, "Key prefix of the ResNet (default: '', 'module.', 'backbone.' or "
                        "'module.backbone.', whichever holds conv1.weight).")
    flags.DEFINE_list("ignore_keys", [], "Modules to drop, e.g. fc (a supervised classifier's head).")
    flags.DEFINE_integer("image_size", None, "Image size recorded for evaluation/export (default 224, CIFAR stem 32).")
    flags.DEFINE_list("mean", None, "Normalisation mean, 3 values (default ImageNet's; CIFAR stem: CIFAR-10's).")
    flags.DEFINE_list("std", None, "Normalisation std, 3 values (default ImageNet's; CIFAR stem: CIFAR-10's).")
    flags.DEFINE_bool("overwrite", False, "Replace an encoder already in --output.")
    flags.mark_flags_as_required(["torch_checkpoint", "output"])


def main(argv) -> None:
    import sys

    from absl import flags

    f = flags.FLAGS
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}")
        path, metadata = convert_torchvision_checkpoint(
            f.torch_checkpoint, f.output, backbone=f.backbone, stem=f.stem, cifar_stem_padding=f.cifar_stem_padding,
            prefix=f.prefix, ignore=f.ignore_keys, image_size=f.image_size, mean=f.mean, std=f.std,
            overwrite=f.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"ERROR: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    print(_summary(metadata, path))


def run() -> None:
    """Console entry point (`bt-keras-convert`)."""
    from absl import app

    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()

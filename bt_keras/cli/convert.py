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

from pathlib import Path

from bt_keras.cli import list_flags_in_help
from bt_keras.interop import torchvision_resnet
from bt_keras.interop.convert import convert_torchvision_checkpoint


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
    list_flags_in_help(__name__, doc=__doc__)
    app.run(main)


if __name__ == "__main__":
    run()

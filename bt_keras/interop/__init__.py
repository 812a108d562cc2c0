"""Reading other frameworks' weights into bt_keras encoders, without those frameworks installed.

* `torch_file`: PyTorch's `torch.save` file format (a zip of `data.pkl` + raw storages) read into NumPy arrays by a
  restricted unpickler that never runs pickled code, and never imports torch.
* `torchvision_resnet`: a torchvision ResNet-18/34/50 state dict (ImageNet or CIFAR stem) mapped onto
  `bt_keras.nets.backbones.resnet`, every key used exactly once.

The command line is `python -m bt_keras.convert`.
"""

from bt_keras.interop.torch_file import ForbiddenGlobalError, load_state_dict, read_torch_file, TorchFileError
from bt_keras.interop.torchvision_resnet import build_encoder, ConversionError, inspect_state_dict

__all__ = [
    "ConversionError",
    "ForbiddenGlobalError",
    "TorchFileError",
    "build_encoder",
    "inspect_state_dict",
    "load_state_dict",
    "read_torch_file",
]

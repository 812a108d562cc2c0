"""bt_keras: Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021) for TensorFlow/Keras.

The method in a few names:
  `BarlowTwins(encoder, projector)`  a keras.Model whose train_step minimises the loss, exact under tf.distribute
  `barlow_twins_loss`, `cross_correlation`  the loss over the global batch (bt_keras.method.losses)
  `backbones.resnet50/resnet18/...`, `heads.projector("8192-8192-8192")`  the networks
  `LARS`, `WarmupCosine`  the paper's optimizer and schedule (bt_keras.method.optim), and solo-learn's form of them
  `OnlineProbe`  a linear classifier trained on stop-gradient features during pre-training (bt_keras.method.probe)

The architecture, module by module: docs/ARCHITECTURE.md. Importing `bt_keras` loads no TensorFlow: the names above
are resolved from their modules on first use, so recipes (`experiments/*.py`, which read `bt_keras.config`) and the
serving client stay light.

Keras files: `encoder.keras` is plain Keras (`keras.saving.load_model` opens it without bt_keras). The full model,
`barlow_twins.keras`, names bt_keras's classes (`bt_keras>BarlowTwins`, `bt_keras>BatchNormalization`, the probe,
LARS); after `import bt_keras` they are registered with Keras as soon as Keras is imported (`_KerasObjects` below),
so `keras.saving.load_model` opens it too.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it (a module name maps to itself).
_PUBLIC = {
    "BarlowTwins": "method.model",
    "LARS": "method.optim",
    "OnlineProbe": "method.probe",
    "WarmupCosine": "method.optim",
    "barlow_twins_loss": "method.losses",
    "cross_correlation": "method.losses",
    "augment": "augment",
    "backbones": "nets.backbones",
    "data": "data",
    "heads": "nets.heads",
    "losses": "method.losses",
    "optim": "method.optim",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bt_keras' has no attribute {name!r}")
    module = importlib.import_module(f"bt_keras.{_PUBLIC[name]}")
    return module if _PUBLIC[name].rpartition(".")[2] == name else getattr(module, name)


# ------------------------------------------------------- Keras classes that saved files name, registered lazily

# The modules whose `@keras.saving.register_keras_serializable(package="bt_keras")` classes a full model file names.
_KERAS_OBJECT_MODULES = ("nets.batch_norm", "method.precision", "method.optim", "method.probe", "method.model")


def _initializing(skip=None) -> bool:
    """True while some bt_keras module other than `skip` is still being executed (its imports are in progress)."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", False)
               for name, module in list(sys.modules.items())
               if module is not None and module is not skip and name.startswith("bt_keras."))


class _KerasObjects(importlib.abc.MetaPathFinder):
    """Registers bt_keras's Keras classes once Keras is imported, so that a bare `import bt_keras` suffices for
    `keras.saving.load_model("barlow_twins.keras")`, without importing TensorFlow before anything else does.

    Registering means importing the modules above, which import TensorFlow and each other: it waits until `keras`
    has been executed and no bt_keras module is half-imported (a module that imports Keras at its top would see its
    own dependants fail otherwise). This finder therefore watches the imports of `keras` and of bt_keras's modules
    and registers after the first one that leaves both conditions true; then it removes itself. Under another Keras
    backend (JAX, NumPy), whose processes only open plain encoder files, nothing is registered.
    """

    def __init__(self):
        self.done = False

    def find_spec(self, name, path, target=None):
        if self.done or not (name == "keras" or name.startswith("bt_keras.")):
            return None
        for finder in sys.meta_path:  # the finders that would have found the module without this one
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader, self)
                return spec
        return None

    def register_if_ready(self, module) -> None:
        """Called after `module` (keras or a bt_keras module) has been executed."""
        keras = sys.modules.get("keras")
        if self.done or keras is None or _initializing(skip=module):
            return
        if keras is not module and getattr(getattr(keras, "__spec__", None), "_initializing", False):
            return  # a module Keras imports while it loads: wait for Keras itself
        self.done = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        if keras.backend.backend() == "tensorflow":
            register_keras_objects()


class _ThenRegister(importlib.abc.Loader):
    """A module's own loader, then `_KerasObjects.register_if_ready` once the module has been executed."""

    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the module's own loader answers
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._finder.register_if_ready(module)


def register_keras_objects() -> None:
    """Registers every bt_keras class a saved Keras file may name (imports their modules, hence TensorFlow)."""
    for module in _KERAS_OBJECT_MODULES:
        importlib.import_module(f"bt_keras.{module}")


if "keras" in sys.modules and not _initializing():
    if sys.modules["keras"].backend.backend() == "tensorflow":
        register_keras_objects()
else:
    sys.meta_path.insert(0, _KerasObjects())

"""The public names of a folder resolved from the modules that define them, on first use.

`bt_keras.augment` and `bt_keras.data` keep the names users and old code know (`bt_keras.data.pretrain_dataset`,
`bt_keras.augment.eval_transform`, the name exports record) without importing TensorFlow when the folder is
imported: each folder's `__getattr__` and `__dir__` come from `folder_names`.
"""

import importlib
import inspect


def _public(module) -> dict:
    """The public names `module` defines (not what it imports: modules, other modules' classes and functions)."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value)
            and getattr(value, "__module__", module.__name__) == module.__name__}


def folder_names(package: str, homes: tuple[str, ...], own_names):
    """(`__getattr__`, `__dir__`) for `package`: a name resolves from the first of the `homes` modules defining it."""

    def __getattr__(name):
        for home in homes:
            public = _public(importlib.import_module(home))
            if name in public:
                return public[name]
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(own_names()) | {name for home in homes for name in _public(importlib.import_module(home))})

    return __getattr__, __dir__

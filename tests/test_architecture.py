"""The layout holds: no import cycles (function-level imports counted), library code never imports a command line,
recipes are data (no TensorFlow), and the installed distribution holds only `bt_keras`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tests.helpers import REPO

PACKAGE = REPO / "bt_keras"
# Command lines: entry points that may import anything; nothing in the library may import them.
# The layers, bottom to top: a module may import its own layer and those below, never one above. Each subpackage is
# one layer; the modules at the top of the package are the base every layer uses, or the kept names of commands.
LAYERS = ("base", "kernels", "nets", "augment", "data", "method", "assembly", "evaluation", "interop", "serving",
          "train", "cli")
COMMAND_NAMES = {"bt_keras.report", "bt_keras.convert", "bt_keras.data_service", "bt_keras.data_check",
                 "bt_keras.evaluate", "bt_keras.evaluate.knn", "bt_keras.evaluate.linear", "bt_keras.evaluate.finetune",
                 "bt_keras.train.__main__"}  # `python -m` names users type, forwarding to bt_keras.cli
MAX_TOP_LEVEL_MODULES = 12


def layer_of(module: str) -> str:
    if module in COMMAND_NAMES or module.startswith("bt_keras.cli"):
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


def cli_modules(modules) -> set[str]:
    """Command lines: entry points that may import anything; nothing in the library may import them."""
    return {name for name in modules if layer_of(name) == "cli"}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every bt_keras module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: the module a.b.c if there is one, else a.b itself.
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    # Importing a.b.c first runs the packages a and a.b: their imports count too.
    for name in list(graph):
        for target in list(graph[name]):
            parts = target.split(".")
            graph[name].update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 25 and graph["bt_keras.train.trainer"] >= {"bt_keras.assembly.builders",
                                                                    "bt_keras.assembly.artifacts"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import b\n")
    b.write_text("def f():\n    from a import x\n")
    graph = {"a": imports_of(a, {"a", "b"}), "b": imports_of(b, {"a", "b"})}
    assert find_cycle(graph) == ["a", "b", "a"]


def test_library_modules_import_no_command_line():
    graph = import_graph()
    commands = cli_modules(graph)
    offenders = {name: sorted(targets & commands) for name, targets in graph.items()
                 if name not in commands and targets & commands}
    assert not offenders, f"library modules importing command lines: {offenders}"
    trainer_users = {name for name, targets in graph.items() if "bt_keras.train.trainer" in targets}
    assert trainer_users <= {"bt_keras.cli.train"}, f"only the CLI drives the loop; also imported by {trainer_users}"


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(f"{name} ({layer_of(name)}) -> {target} ({layer_of(target)})" for name, targets in graph.items()
                    for target in targets if rank[layer_of(target)] > rank[layer_of(name)])
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("bt_keras.method.model") == "method" and layer_of("bt_keras.paths") == "base"
    assert layer_of("bt_keras.evaluate.knn") == "cli" and layer_of("bt_keras.train.__main__") == "cli"
    graph = {"bt_keras.nets.backbones": {"bt_keras.train.trainer"}, "bt_keras.train.trainer": set()}
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    assert [(a, b) for a, targets in graph.items() for b in targets
            if rank[layer_of(b)] > rank[layer_of(a)]] == [("bt_keras.nets.backbones", "bt_keras.train.trainer")]


def test_the_package_top_holds_few_modules_and_every_folder_is_a_layer():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert set(folders) <= set(LAYERS) | {"evaluate"}, folders  # evaluate/: the kept command names only
    assert all(layer_of(f"bt_keras.evaluate.{p.stem}".removesuffix(".__init__")) == "cli"
               for p in (PACKAGE / "evaluate").glob("*.py"))


def _fresh_python(code: str, cwd=REPO, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (REPO / "experiments").glob("*.py")
                                          if p.stem not in ("results_table", "__init__")))
def test_recipes_are_data_and_load_no_tensorflow(recipe):
    code = (f"import sys, importlib; c = importlib.import_module('experiments.{recipe}').get_config(); "
            "assert c.view1.crop_size is None, c.view1.crop_size; "
            "heavy = [m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_importing_the_package_loads_no_tensorflow_until_a_name_is_used():
    code = ("import sys, bt_keras, bt_keras.config, bt_keras.views, bt_keras.serving.client; "
            "assert 'tensorflow' not in sys.modules; bt_keras.LARS; assert 'tensorflow' in sys.modules")
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_export_is_a_repository_folder_not_an_installed_package(tmp_path):
    outside = _fresh_python("import export", cwd=tmp_path, PYTHONPATH="")
    assert outside.returncode != 0 and "No module named 'export'" in outside.stderr
    inside = subprocess.run([sys.executable, "-m", "export.savedmodel", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert "--export_dir" in inside.stdout and "Traceback" not in inside.stderr, inside.stderr[-2000:]  # absl: exit 1


@pytest.mark.slow
def test_the_wheel_installs_only_bt_keras(tmp_path):
    """A non-editable install (`pip install .`) gets exactly what the wheel holds."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("bt_keras-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"bt_keras", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "bt_keras/kernels/lars_update.cc" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "bt-keras-train = bt_keras.cli.train:run" in entry_points


def test_the_folders_public_names_resolve_and_nothing_they_merely_import():
    """`bt_keras.augment.X` / `bt_keras.data.X` (the names README and old code use) resolve from the modules that
    define them; what those modules only import (tf, np, other modules) is no attribute of the package."""
    from bt_keras import augment, data

    from bt_keras.augment import eval_transforms, ops
    from bt_keras.data import labelled, pretrain, sources
    assert augment.augment_batch is ops.augment_batch and augment.eval_transform is eval_transforms.eval_transform
    assert data.pretrain_dataset is pretrain.pretrain_dataset and data.labelled_dataset is labelled.labelled_dataset
    assert data.dataset_info is sources.dataset_info and augment.ViewConfig.__module__ == "bt_keras.views"
    assert {"augment_batch", "eval_transform", "ViewConfig"} <= set(dir(augment))
    for package, name in ((data, "tf"), (data, "device_augment"), (augment, "np"), (augment, "normalize_nothing")):
        with pytest.raises(AttributeError):
            getattr(package, name)

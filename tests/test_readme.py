"""The README's promises, checked: its `model.fit` snippet runs as written, its commands are what CI runs, and it (with
export/README.md) says a SavedModel encoder must be trusted."""

import os
import re

import keras
import numpy as np
import pytest
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.slow
def test_fit_snippet_runs_as_written(tmp_path, monkeypatch):
    snippet = re.search(r"<!-- snippet: fit.*?-->\s*```python\n(.*?)```", README, re.S).group(1)
    assert 10 <= len(snippet.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    history = namespace["model"].history.history
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    reloaded = keras.models.load_model(tmp_path / "encoder.keras")
    assert reloaded.output_shape[-1] == namespace["features"].shape[-1] == 128  # ResNet-18 at 1/4 width


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c).strip()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f"README's test command {test_command!r} is not a line of .ci/run"
    assert os.access(REPO / ".ci" / "run", os.X_OK)


@pytest.mark.hostile
def test_readmes_say_a_savedmodel_encoder_must_be_trusted():
    for readme in ("README.md", "export/README.md"):
        text = " ".join((REPO / readme).read_text().split())
        assert "Trust: a SavedModel" in text and "is a program, not data" in text, readme
        assert "reading and writing files" in text and "trust" in text.split("Trust: a SavedModel", 1)[1][:400]

"""The closing table's few-label columns (bt_keras.train.baselines): seeded, class-balanced draws shared by every
representation, the kNN on them, the new baselines.json keys beside the old ones, and the printed table (older
saved rows without the new keys still print)."""

import re

import numpy as np
import pytest

from bt_keras.train import baselines


def test_labelled_draws_are_seeded_balanced_and_the_same_for_every_representation():
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    draws = baselines.labelled_draws(labels, 5)
    assert len(draws) == baselines.FEW_LABEL_DRAWS
    for chosen in draws:
        assert np.bincount(labels[chosen]).tolist() == [5] * 10
    assert [d.tolist() for d in draws] == [d.tolist() for d in baselines.labelled_draws(labels, 5)]
    assert len({tuple(d) for d in draws}) == len(draws)  # different draws
    few = np.array([0, 0, 1])  # a class with fewer examples than asked gives all it has
    assert sorted(baselines.labelled_draws(few, 5, draws=1)[0].tolist()) == [0, 1, 2]


def test_few_label_accuracy_and_score_keys():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 50)
    centres = rng.normal(size=(4, 8)) * 3
    x = (centres[labels] + rng.normal(size=(200, 8))).astype(np.float32)
    separable = baselines.few_label_accuracy(x, labels, x, labels, per_class=1, k=20, temperature=0.1, num_classes=4)
    noise = rng.normal(size=(200, 8)).astype(np.float32)
    chance = baselines.few_label_accuracy(noise, labels, noise, labels, per_class=1, k=20, temperature=0.1,
                                          num_classes=4)
    assert separable > 0.8 and chance < 0.5
    row = baselines.score(x, labels, x, labels, k=20, temperature=0.1, num_classes=4)
    assert set(row) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5", "knn_top1_1_per_class",
                        "knn_top1_5_per_class"}
    assert row["knn_top1_1_per_class"] == pytest.approx(separable)


def test_table_prints_the_few_label_columns_when_every_row_has_them():
    rows = [{"name": name, "knn_top1": 0.5, "linear_top1": 0.25, "knn_top1_1_per_class": 0.125,
             "knn_top1_5_per_class": 0.375} for name in baselines.ROWS]
    lines = baselines.format_table(rows, 20).splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["kNN top-1 (k=20)", "linear top-1", "kNN, 1 label/class",
                                                      "kNN, 5 labels/class"]
    assert lines[3].split() == ["Barlow", "Twins", "0.500", "0.250", "0.125", "0.375"]
    assert len({len(line) for line in lines}) == 1  # aligned
    old = [{k: v for k, v in row.items() if not k.startswith("knn_top1_")} for row in rows]  # an older baselines.json
    assert baselines.format_table(old, 20).splitlines()[0].split() == ["kNN", "top-1", "(k=20)", "linear", "top-1"]

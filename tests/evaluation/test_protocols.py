"""Evaluation protocols: kNN against an independent NumPy reference, the L-BFGS probe, subsets, frozen vs fine-tuned
weights, every CLI end to end on a tiny encoder and CIFAR-10 (../shared/tfds), SavedModel exports, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import data
from bt_keras.assembly import artifacts
from bt_keras.cli import evaluate as cli
from bt_keras.cli import evaluate_finetune as finetune_cli
from bt_keras.cli import evaluate_knn as knn_cli
from bt_keras.cli import evaluate_linear as linear_cli
from bt_keras.data import sources
from bt_keras.evaluation import classifiers, features, knn, preprocessing, protocol
from bt_keras.nets import backbones
from tests.helpers import TFDS_DIR, numpy_knn, numpy_knn_topk, numpy_topk_accuracy
from tests.in_process import evaluate_in_process as run  # a command in this process: its flags, its run()

needs_cifar = pytest.mark.skipif(not (TFDS_DIR / "cifar10").is_dir(),
                                 reason=f"CIFAR-10 in TFDS format not found at {TFDS_DIR}")
CIFAR_STATS = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}
QUICK = ["--limit_train=200", "--limit_test=100", "--verbose=0"]


def tiny_encoder(image_size=32, seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.resnet18(input_shape=(image_size, image_size, 3), stem="cifar", width_multiplier=1 / 16,
                              blocks=(1, 1))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A workdir-like folder with a tiny 32-px encoder.keras + encoder.json, as training writes them."""
    directory = tmp_path_factory.mktemp("workdir")
    artifacts.save_encoder(tiny_encoder(32), directory, {"image_size": 32, **CIFAR_STATS, "dataset": "tfds:cifar10",
                                                           "backbone": "resnet18", "step": 7})
    return directory


# ------------------------------------------------------------------------------------------------------ kNN maths


def test_knn_matches_numpy_reference():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(120, 6)), rng.normal(size=(40, 6))
    train_y, test_y = rng.integers(0, 9, 120), rng.integers(0, 9, 40)
    votes = numpy_knn(train_x, train_y, test_x, k=15, temperature=0.1, num_classes=9)
    scores = knn.knn_scores(train_x, train_y, test_x, k=15, temperature=0.1, num_classes=9)
    np.testing.assert_allclose(scores * np.exp(1 / 0.1), votes, rtol=1e-10)  # same votes, scaled by exp(-1/T)
    expected = numpy_knn_topk(votes, test_y)
    assert 0 < expected[0] < expected[1] < 1  # a case where top-1 and top-5 differ
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, k=15, temperature=0.1, num_classes=9) == expected
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, k=15, temperature=0.1, num_classes=9,
                            chunk_size=7) == expected  # chunking changes nothing
    as_float32 = [a.astype(np.float32) for a in (train_x, test_x)]
    assert knn.knn_accuracy(as_float32[0], train_y, as_float32[1], test_y, k=15, temperature=0.1,
                            num_classes=9) == expected
    # k larger than the training set: every training example votes
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, k=1000, num_classes=9) == \
        numpy_knn_topk(numpy_knn(train_x, train_y, test_x, 1000, 0.1, 9), test_y)


def test_knn_with_one_training_example_predicts_its_class_only():
    """--limit_train=1 with k=200 reported a top-5 of 100%: ten classes, one voted; the others never count."""
    rng = np.random.default_rng(1)
    train_x, test_x = rng.normal(size=(1, 4)), rng.normal(size=(50, 4))
    test_y = np.arange(50) % 10
    top1, top5 = knn.knn_accuracy(train_x, np.array([3]), test_x, test_y, k=200, num_classes=10)
    assert top1 == top5 == 0.1  # exactly the class-3 rows


def test_knn_ties_are_broken_by_index_like_the_reference():
    # Two identical training vectors of classes 2 (index 0) and 0 (index 1), two other classes far away.
    train_x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.6, 0.8]])
    train_y = np.array([2, 0, 1, 3, 5, 4])
    test_x = np.array([[1.0, 0.0]] * 4)
    test_y = np.array([2, 0, 0, 2])
    # k=1: equally similar neighbours -> the lower training index (class 2) is taken; class 0 got no vote, so it is
    # not in the top 5 either (zero scores ranked by index used to count: top-5 of 100% from one neighbour).
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, k=1, num_classes=6) == (0.5, 0.5)
    # k=2: classes 0 and 2 get equal votes -> class 0 (lower class index) ranks first; both are in the top 5.
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, k=2, num_classes=6) == (0.5, 1.0)
    top1_k2 = knn.knn_scores(train_x, train_y, test_x[:1], k=2, num_classes=6).argmax()
    assert top1_k2 == 0
    for k in (1, 2, 3, 6):
        assert knn.knn_accuracy(train_x, train_y, test_x, test_y, k=k, num_classes=6) == \
            numpy_knn_topk(numpy_knn(train_x, train_y, test_x, k, 0.1, 6), test_y), k
    # k=6: votes e^10 (classes 0, 2), e^6 (4), e^0 (1 and 5, tied), e^-10 (3): ranking 0, 2, 4, 1, 5, 3.
    assert knn.knn_accuracy(train_x, train_y, test_x[:1], np.array([5]), k=6, num_classes=6) == (0.0, 1.0)
    assert knn.knn_accuracy(train_x, train_y, test_x[:1], np.array([3]), k=6, num_classes=6) == (0.0, 0.0)


def test_topk_accuracy_counts_a_tie_once():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert features.topk_accuracy(scores, [1, 1], (1, 2)) == (0.5, 1.0)


# ------------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_features_separates_separable_features():
    rng = np.random.default_rng(1)
    centres = 4.0 * rng.normal(size=(4, 16))

    def sample(n):
        y = rng.integers(0, 4, n)
        return centres[y] + rng.normal(size=(n, 16)), y

    (train_x, train_y), (test_x, test_y) = sample(400), sample(200)
    result = classifiers.linear_probe_features(train_x, train_y, test_x, test_y, seed=0)
    assert result["top1"] >= 0.995 and result["top5"] == 1.0
    assert len(result["val_accuracy"]) == len(classifiers.DEFAULT_CS) and result["C"] in classifiers.DEFAULT_CS
    assert max(result["val_accuracy"].values()) >= 0.99 and result["converged"]


def synthetic_batches(image_size=8, n=32, batch=16, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, num_classes, n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def separable_batches(n=96, image_size=8, num_classes=3, seed=0, batch=16):
    """Images whose class is their mean colour (plus noise): any working classifier on a random encoder separates
    them, so accuracy far above chance (1/3) shows that the protocol learns."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    colours = np.eye(3, dtype="float32")[:num_classes] * 3.0 - 1.0
    x = colours[y][:, None, None, :] + 0.3 * rng.normal(size=(n, image_size, image_size, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x.astype("float32"), y.astype("int32"))).batch(batch)


@pytest.mark.slow
def test_linear_sgd_and_finetuning_learn_separable_data():
    train, test = separable_batches(seed=0), separable_batches(seed=1)
    linear = classifiers.linear_probe(tiny_encoder(8), train, test, num_classes=3, epochs=15, lr=0.3)
    tuned = classifiers.finetune(tiny_encoder(8), train, test, num_classes=3, epochs=15)
    encoder = tiny_encoder(8)
    untrained, _, _ = classifiers.evaluate_classifier(encoder, classifiers.make_head(int(encoder.output_shape[-1]), 3),
                                                      test)
    assert linear["top1"] >= 0.9 and tuned["top1"] >= 0.9, (linear["top1"], tuned["top1"])
    assert untrained <= 0.6  # the head at its initialisation is near chance, so the check above means learning


def snapshot_names(variables):
    return [v.path for v in variables]


def snapshot(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


def test_linear_evaluation_leaves_every_encoder_weight_unchanged():
    encoder = tiny_encoder(8)
    assert encoder.non_trainable_weights  # BatchNorm moving statistics are part of the check
    before = snapshot(encoder)
    batches = synthetic_batches()
    result = classifiers.linear_probe(encoder, batches, batches, num_classes=3, epochs=2)
    assert [h["examples"] for h in result["history"]] == [32, 32]
    initial_head = classifiers.make_head(int(encoder.output_shape[-1]), 3, seed=0)  # linear_probe's, seed 0
    head_kernel = result["head"].kernel.numpy()
    assert np.isfinite(head_kernel).all() and not np.allclose(head_kernel, initial_head.kernel.numpy())  # it trained
    after = snapshot(encoder)
    assert all(np.array_equal(before[k], after[k]) for k in before), \
        [k for k in before if not np.array_equal(before[k], after[k])]


def test_finetuning_changes_the_encoder_including_batchnorm_statistics():
    encoder = tiny_encoder(8)
    before = snapshot(encoder)
    batches = synthetic_batches()
    result = classifiers.finetune(encoder, batches, batches, num_classes=3, epochs=2)
    after = snapshot(encoder)
    unchanged = [k for k in before if np.array_equal(before[k], after[k])]
    assert all(k.endswith(("moving_mean", "moving_variance")) for k in snapshot_names(encoder.non_trainable_weights))
    # Every kernel, bias, beta and BatchNorm moving statistic moves. The residual branches' last BN starts at
    # gamma = 0 (zero_init_residual, as the official code), so their first BN's gamma gets no gradient at step 1
    # and a ~1e-10 one at step 2, below float32's resolution at 1.0: those two gammas may stay put.
    assert all(k.endswith("block1_bn1/gamma") for k in unchanged), unchanged
    assert len(unchanged) <= 2
    assert result["num_train_examples"] == 32 and result["num_test_examples"] == 32
    # The accuracies, recomputed in NumPy from the fine-tuned encoder's features and the returned head (3 classes:
    # top-5 is 1). Exact: no label score is within 1e-4 of another class's (float32 round-off is ~1e-6 here).
    images, labels = (np.concatenate(parts) for parts in zip(*[(x.numpy(), y.numpy()) for x, y in batches]))
    logits = encoder(images, training=False).numpy().astype(np.float64) @ result["head"].kernel.numpy() \
        + result["head"].bias.numpy()
    (top1, top5), margin = numpy_topk_accuracy(logits, labels)
    assert (result["top1"], result["top5"]) == (top1, top5) and margin > 1e-4, (result["top1"], top1, margin)
    assert 0.0 < top1 < 1.0 and top5 == 1.0  # neither 0 nor all: an off-by-one or a swapped k would show
    assert [h["lr_backbone"] for h in result["history"]] == pytest.approx([0.005, 0.0025])  # cosine per epoch
    assert [h["lr_head"] for h in result["history"]] == pytest.approx([0.5, 0.25])


# ------------------------------------------------------------------------------------------------------- subsets


def digits_prep():
    info = data.dataset_info("digits")
    return info, preprocessing.Preprocessing(32, info.mean, info.std)


def subset_images(subset, seed):
    info, prep = digits_prep()
    batches = preprocessing.labelled_batches("digits", "train", prep, info, batch_size=512, subset=subset, seed=seed)
    images, labels = (np.concatenate(parts) for parts in zip(*[(x.numpy(), y.numpy()) for x, y in batches]))
    return images, labels


def test_subset_is_class_balanced_and_seeded():
    _, all_labels = sources._digits_arrays()
    per_class = np.bincount(all_labels[sources._digits_split("train")])
    images, labels = subset_images(0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.round(0.1 * per_class))
    same_images, same_labels = subset_images(0.1, seed=0)
    np.testing.assert_array_equal(images, same_images)
    other_images, _ = subset_images(0.1, seed=1)
    assert images.shape == other_images.shape and not np.array_equal(images, other_images)
    _, five = subset_images(5, seed=0)
    np.testing.assert_array_equal(np.bincount(five, minlength=10), [5] * 10)


@pytest.mark.slow
def test_finetune_cli_trains_on_the_balanced_subset(encoder_dir, tmp_path):
    """Through the CLI: --subset=2 on digits trains on exactly 2 images per class (the encoder's CIFAR statistics
    differ from the digits', so the re-normalisation path runs too)."""
    out = tmp_path / "ft.json"
    record = run(finetune_cli, f"--encoder={encoder_dir}", "--dataset=digits", "--subset=2", "--epochs=1",
                 "--batch_size=32", "--limit_test=64", "--verbose=0", f"--output={out}")
    assert record["class_counts"] == [2] * 10 and record["num_train_examples"] == 20
    assert json.loads(out.read_text())["settings"]["subset"] == 2


def test_empty_subset_is_refused_naming_the_fix(encoder_dir):
    with pytest.raises(ValueError, match=r"classes would be empty.*--subset >= 0\.0035.*--subset=1"):
        run(finetune_cli, f"--encoder={encoder_dir}", "--dataset=digits", "--subset=0.0001", "--verbose=0")


def test_limit_and_subset_together_are_refused(encoder_dir):
    with pytest.raises(ValueError, match="use one of them"):
        run(finetune_cli, f"--encoder={encoder_dir}", "--dataset=digits", "--subset=2", "--limit_train=10",
            "--verbose=0")


# ------------------------------------------------------------------------------------------- CLIs end to end


@pytest.mark.slow
@needs_cifar
def test_knn_cli_in_a_subprocess(encoder_dir, tmp_path):
    out = tmp_path / "knn.json"
    done = subprocess.run(
        [sys.executable, "-m", "bt_keras.evaluate.knn", f"--encoder={encoder_dir}", "--dataset=tfds:cifar10",
         f"--data_dir={TFDS_DIR}", "--k=20", "--temperature=0.1", f"--output={out}", *QUICK],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| kNN k=20 T=0.1 |" in done.stdout
    record = json.loads(out.read_text())
    assert record["protocol"] == "knn" and record["dataset"] == "tfds:cifar10" and record["split"] == "test"
    assert (record["num_train_examples"], record["num_test_examples"]) == (200, 100)
    assert record["settings"]["k"] == 20 and record["encoder"]["step"] == 7
    assert record["preprocessing"] == {"image_size": 32, **CIFAR_STATS} and record["time_seconds"] > 0
    # the same number in-process, from the Python API
    s = protocol.setup(encoder_dir, dataset="tfds:cifar10", data_dir=TFDS_DIR, limit_train=200, limit_test=100,
                     verbose=0)
    train, test = s.train_features(), s.test_features()
    assert knn.knn_accuracy(*train, *test, k=20, num_classes=10) == (record["top1"], record["top5"])


@pytest.mark.slow
@needs_cifar
def test_linear_cli_both_modes(encoder_dir, monkeypatch):
    probed = []  # full mode's (encoder, test batches, result), for the NumPy recount below
    linear_probe = classifiers.linear_probe
    monkeypatch.setattr(classifiers, "linear_probe", lambda encoder, train, test, *a, **k: probed.append(
        (encoder, test, linear_probe(encoder, train, test, *a, **k))) or probed[-1][-1])
    record = run(linear_cli, f"--encoder={encoder_dir}", f"--data_dir={TFDS_DIR}", "--C=0.1,1", *QUICK)
    assert record["protocol"] == "linear_features" and record["C"] in (0.1, 1.0)
    assert Path(record["output"]) == encoder_dir / "eval_linear_features_tfds_cifar10.json"  # beside the encoder
    assert json.loads(Path(record["output"]).read_text())["num_train_examples"] == 200
    record = run(linear_cli, f"--encoder={encoder_dir}", f"--data_dir={TFDS_DIR}", "--mode=full", "--epochs=2",
                 "--batch_size=64", "--limit_train=128", "--limit_test=64", "--verbose=0")
    assert record["protocol"] == "linear_full" and record["num_train_examples"] == 128
    assert [h["lr_head"] for h in record["history"]] == pytest.approx([0.3, 0.15])
    assert record["num_test_examples"] == 64
    # The record's accuracies, recounted in NumPy from the frozen encoder's features of the test batches and the
    # trained head. Exact: no label score is within 1e-4 of another class's (float32 round-off is ~1e-6 here).
    (encoder, test, result), = probed
    model = classifiers.as_callable(encoder)
    features, labels = (np.concatenate(parts) for parts in zip(*[(model(x, training=False).numpy(), y.numpy())
                                                                   for x, y in test]))
    logits = features.astype(np.float64) @ result["head"].kernel.numpy() + result["head"].bias.numpy()
    (top1, top5), margin = numpy_topk_accuracy(logits, labels)
    assert len(labels) == 64 and margin > 1e-4, margin
    assert (record["top1"], record["top5"]) == (top1, top5), (record["top1"], record["top5"], top1, top5)
    assert top1 < top5 < 1.0  # 10 classes, an untrained encoder: a swapped k or an off-by-one would show


@pytest.mark.slow
@needs_cifar
def test_finetune_cli_on_cifar(encoder_dir, tmp_path):
    record = run(finetune_cli, f"--encoder={encoder_dir}", f"--data_dir={TFDS_DIR}", "--epochs=1", "--batch_size=32",
                 "--limit_train=64", "--limit_test=64", "--verbose=0", f"--output={tmp_path / 'ft.json'}")
    assert record["protocol"] == "finetune" and record["num_train_examples"] == 64
    assert sum(record["class_counts"]) == 64 and (tmp_path / "ft.json").is_file()


@pytest.mark.slow
@needs_cifar
def test_savedmodel_export_is_evaluated_like_its_keras_encoder(encoder_dir, tmp_path, monkeypatch):
    from bt_keras.serving import savedmodel as export
    encoder, metadata = artifacts.load_encoder(encoder_dir)
    export.export_encoder(encoder, metadata, tmp_path / "models")
    monkeypatch.chdir(tmp_path)  # a SavedModel's default result goes to the current directory
    exported = run(knn_cli, f"--encoder={tmp_path / 'models'}", f"--data_dir={TFDS_DIR}", "--k=20", *QUICK)
    assert exported["encoder"]["kind"] == "savedmodel" and exported["encoder"]["path"].endswith("models/1")
    assert Path(exported["output"]) == tmp_path / "eval_knn_tfds_cifar10.json"
    keras_result = run(knn_cli, f"--encoder={encoder_dir}", f"--data_dir={TFDS_DIR}", "--k=20", *QUICK,
                       f"--output={tmp_path / 'keras.json'}")
    assert (exported["top1"], exported["top5"]) == (keras_result["top1"], keras_result["top5"])
    full = run(linear_cli, f"--encoder={tmp_path / 'models' / '1'}", f"--data_dir={TFDS_DIR}", "--mode=full",
               "--epochs=1", "--batch_size=64", "--limit_train=64", "--limit_test=64", "--verbose=0")
    assert full["encoder"]["kind"] == "savedmodel" and full["num_train_examples"] == 64
    with pytest.raises(ValueError, match="inference-only"):
        run(finetune_cli, f"--encoder={tmp_path / 'models' / '1'}", f"--data_dir={TFDS_DIR}", *QUICK)


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Pass a training workdir"):
        run(knn_cli, f"--encoder={tmp_path / 'nowhere'}", "--dataset=digits")
    with pytest.raises(FileNotFoundError, match="No encoder at"):  # a folder without an encoder in it
        artifacts.open_encoder(tmp_path)


def test_encoder_of_another_input_size_is_refused(tmp_path):
    artifacts.save_encoder(tiny_encoder(16), tmp_path / "e16", {"image_size": 16, **CIFAR_STATS})
    with pytest.raises(ValueError, match=r"built for 16x16 inputs, but evaluation would feed 32x32"):
        run(knn_cli, f"--encoder={tmp_path / 'e16'}", "--dataset=digits", "--image_size=32")
    artifacts.save_encoder(tiny_encoder(16), tmp_path / "lying", {"image_size": 32, **CIFAR_STATS})
    with pytest.raises(ValueError, match=r"takes 16x16 images but its metadata says image_size=32"):
        run(knn_cli, f"--encoder={tmp_path / 'lying'}", "--dataset=digits")


def test_model_of_another_architecture_is_refused(tmp_path):
    head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(10)])
    artifacts.save_encoder(head, tmp_path / "head", {"image_size": 32, **CIFAR_STATS})
    with pytest.raises(ValueError, match="another architecture.*image encoder"):
        run(linear_cli, f"--encoder={tmp_path / 'head'}", "--dataset=digits")


def test_dataset_without_labels_is_refused(encoder_dir, tmp_path):
    import tensorflow_datasets as tfds

    images = np.zeros((4, 32, 32, 3), np.uint8)
    tfds.dataset_builders.store_as_tfds_dataset(
        name="bt_keras_unlabelled_images", version="1.0.0", data_dir=tmp_path,
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(32, 32, 3))}),
        split_datasets={"train": [(str(i), {"image": image}) for i, image in enumerate(images)]})
    with pytest.raises(ValueError, match="has no labels"):
        run(knn_cli, f"--encoder={encoder_dir}", "--dataset=tfds:bt_keras_unlabelled_images", f"--data_dir={tmp_path}")
    with pytest.raises(ValueError, match="unlabelled examples"):  # e.g. STL-10's `unlabelled` split, labels -1
        features.check_labels(np.array([3, -1]), 10, "tfds:stl10 'unlabelled'")


def test_cli_errors_are_one_line_messages():
    def failing(fv):
        raise ValueError("what went wrong, and the fix")

    with pytest.raises(SystemExit, match="^prog: error: what went wrong, and the fix$"):
        cli.cli_main(failing, "prog")(["prog"])

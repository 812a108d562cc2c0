"""benchmarks/accelerator.py: its smoke run goes end to end on the CPU and its JSON adds up; its helpers are right.

Speed is not tested (a smoke run measures nothing). What is: every preset and mode ran and recorded positive rates
and memory, the ratios are the ratios of the recorded numbers, the FLOP rates are the counted FLOPs over the step
time, the float64 agreement is finite and small for float32, the input pipeline is set against what the step
consumes, the goals are there with `met` null, and the JSON says it is a smoke run and on which device. In-process:
the FLOP count of a tiny model against a hand count, and the batch fallback on a fake out-of-memory error.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import accelerator, harness
from tests.helpers import REPO

pytestmark = pytest.mark.accelerator

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    output = tmp_path_factory.mktemp("accelerator") / "x.json"
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--smoke", "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(output.read_text()), proc.stdout


@pytest.mark.slow
def test_smoke_prints_the_tables(smoke):
    _, stdout = smoke
    assert stdout.startswith("SMOKE RUN")
    for preset in ("cifar", "imagenet"):
        for mode in ("float32 (float32)", "mixed (mixed_bfloat16)", "mixed_xla (mixed_bfloat16, XLA)"):
            assert f"| {preset:<8} | {mode}" in stdout
    for line in ("| preset   | mode", "One step against float64", "Host input pipeline", "| goal", "n/a (smoke)",
                 "SMOKE (CPU-sized, not a GPU figure): wrote"):
        assert line in stdout


@pytest.mark.slow
def test_smoke_json_says_what_it_is(smoke):
    report, _ = smoke
    assert report["smoke"] is True
    env = report["environment"]
    assert report["device"] == env["device_kind"] == "CPU"  # no GPU here: nobody may read this as a GPU figure
    for key in ("tensorflow", "keras", "devices", "cuda_build_version", "cudnn_build_version", "gpu_name"):
        assert key in env
    assert env["tensorflow"].startswith("2.") and env["keras"].startswith("3.")
    assert set(report["presets"]) == {"cifar", "imagenet"}
    assert report["settings"]["warmup"] == 1 and report["settings"]["steps"] == 2


@pytest.mark.slow
def test_smoke_rates_memory_and_ratios_add_up(smoke):
    report, _ = smoke
    for name, preset in report["presets"].items():
        assert set(preset["modes"]) == {"float32", "mixed", "mixed_xla"}, name
        float32_pairs = preset["modes"]["float32"]["barlow_twins"]["pairs_per_s"]
        for mode, r in preset["modes"].items():
            bt, sup = r["barlow_twins"], r["supervised"]
            assert r["batch_fitted"] in r["batch_candidates"] and r["batch_out_of_memory"] == []
            assert bt["policy"] == sup["policy"] == ("float32" if mode == "float32" else "mixed_bfloat16")
            assert bt["xla_compiled"] is sup["xla_compiled"] is (mode == "mixed_xla")
            for step in (bt, sup):
                assert step["finite"] and step["step_s"] > 0 and step["peak_memory_bytes"] > 0
                assert step["timed_steps"] == 2 and step["warmup_steps"] >= 1
            assert bt["pairs_per_s"] > 0 and sup["images_per_s"] > 0
            assert bt["pairs_per_s"] == pytest.approx(bt["global_batch"] / bt["step_s"])
            assert bt["view_images_per_s"] == pytest.approx(2 * bt["pairs_per_s"])
            assert sup["images_per_s"] == pytest.approx(sup["global_batch"] / sup["step_s"])
            # FLOP rates: the counted FLOPs of one step over its time; the headline ratio is theirs.
            assert bt["flop_per_s"] == pytest.approx(bt["flops"]["gflop_per_image"] * 1e9 * bt["pairs_per_s"])
            assert sup["flop_per_s"] == pytest.approx(sup["flops"]["gflop_per_image"] * 1e9 * sup["images_per_s"])
            assert r["bt_over_supervised_flops"] == pytest.approx(bt["flop_per_s"] / sup["flop_per_s"])
            assert r["over_float32"] == pytest.approx(bt["pairs_per_s"] / float32_pairs)
            # The counts: a pair is 2 views x 3 x 2 x (encoder + projector MACs) + 3 x 2 x D^2; a supervised image
            # 3 x 2 x (encoder + head MACs), the same encoder.
            f, g = bt["flops"], sup["flops"]
            assert f["gflop_per_image"] == pytest.approx(
                12 * (f["encoder_gmac_per_view"] + f["projector_gmac_per_view"]) + 6 * f["embedding_dim"] ** 2 / 1e9)
            assert g["gflop_per_image"] == pytest.approx(6 * (g["encoder_gmac_per_view"] + g["head_gmac"]))
            assert f["encoder_gmac_per_view"] == pytest.approx(g["encoder_gmac_per_view"]) and g["head_gmac"] > 0
            features, classes = {"cifar": (512 // 4, 10), "imagenet": (2048 // 4, 1000)}[name]  # width 1/4
            assert f["embedding_dim"] == 256 and g["head_gmac"] * 1e9 == pytest.approx(features * classes)
        assert preset["modes"]["float32"]["over_float32"] == 1.0


@pytest.mark.slow
def test_smoke_agreement_with_float64(smoke):
    report, _ = smoke
    for name, preset in report["presets"].items():
        agreement = preset["agreement"]
        assert agreement["batch"] == 16 and math.isfinite(agreement["reference_loss"])
        assert agreement["reference_largest_update"] > 0  # the step moved the weights
        steps = agreement["steps"]
        assert set(steps) == {"float32", "mixed", "mixed_xla"}
        for step in steps.values():
            for key in ("loss_rel_diff", "weights_diff_over_update", "weights_diff_over_weight",
                        "moving_stats_max_rel_diff"):
                assert math.isfinite(step[key]) and step[key] >= 0, (name, key)
        f32 = steps["float32"]
        assert f32["loss_rel_diff"] < 1e-5, name
        assert f32["weights_diff_over_update"] < 0.05, name  # a ReLU input at 0 can cost a few % at batch 16
        assert f32["weights_diff_over_weight"] < 1e-3 and f32["moving_stats_max_rel_diff"] < 1e-4, name
        for mode in ("mixed", "mixed_xla"):  # bfloat16: 8 bits of mantissa, but the same step
            assert steps[mode]["loss_rel_diff"] < 0.05 and steps[mode]["weights_diff_over_update"] < 1.0, name
            assert steps[mode]["loss_rel_diff"] > f32["loss_rel_diff"], name


@pytest.mark.slow
def test_smoke_input_pipeline_against_the_step_and_goals(smoke):
    report, _ = smoke
    for name, preset in report["presets"].items():
        pipe = preset["input_pipeline"]
        fastest = max(preset["modes"].values(), key=lambda r: r["barlow_twins"]["pairs_per_s"])
        assert pipe["step_consumes_pairs_per_s"] == fastest["barlow_twins"]["pairs_per_s"]
        for mode in ("host", "accelerator"):
            assert pipe[mode]["pairs_per_s_median"] > 0
            assert pipe[mode]["over_step"] == pytest.approx(
                pipe[mode]["pairs_per_s_median"] / pipe["step_consumes_pairs_per_s"])
    goals = {(g["mode"], g["metric"]): g for g in report["goals"]}
    imagenet = report["presets"]["imagenet"]["modes"]["mixed_xla"]
    assert goals[("mixed_xla", "bt_over_supervised_flops")]["target"] == 0.8
    assert goals[("mixed_xla", "over_float32")]["target"] == 2.0
    for (mode, metric), goal in goals.items():
        assert goal["measured"] == pytest.approx(imagenet[metric]) and goal["met"] is None  # smoke: no verdict


# ---------------------------------------------------------------------------------------------- in-process


def test_flop_count_of_a_tiny_model_against_a_hand_count():
    import keras

    from bt_keras import BarlowTwins
    from bt_keras.nets import heads

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    model = BarlowTwins(encoder, heads.projector("6-5"))
    conv = 8 * 8 * 4 * 3 * 3 * 3  # output pixels x output channels x kernel x input channels
    projector = 4 * 6 + 6 * 5
    flops = harness.count_flops(model, 10)
    per_pair = 2 * 3 * 2 * (conv + projector) + 3 * 2 * 5 * 5
    assert flops["gflop_per_image"] * 1e9 == pytest.approx(per_pair)
    assert flops["gflop_per_step"] * 1e9 == pytest.approx(10 * per_pair)
    # The supervised network as the benchmark counts it: the same encoder and a 10-class head.
    head = keras.Sequential([keras.layers.Dense(10)])
    head.build((None, 4))
    counted = harness.count_flops(accelerator._Parts(encoder, head), 10)
    assert counted["encoder_gmac_per_view"] * 1e9 == conv and counted["projector_gmac_per_view"] * 1e9 == 40
    assert accelerator.supervised_flops(conv, 40) == 3 * 2 * (conv + 40)


def test_the_batch_falls_back_on_out_of_memory_and_only_then():
    import tensorflow as tf

    tried = []

    def attempt(batch):
        tried.append(batch)
        if batch > 64:
            raise tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating tensor for batch {batch}")
        return {"ran": batch}

    batch, result, failures = accelerator.first_fitting((64, 256, 128), attempt)
    assert (batch, result, tried) == (64, {"ran": 64}, [256, 128, 64])  # largest first
    assert [f["batch"] for f in failures] == [256, 128] and "OOM" in failures[0]["error"]

    def xla_oom(batch):
        if batch == 256:
            raise tf.errors.InternalError(None, None, "RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return batch

    assert accelerator.first_fitting((256, 128), xla_oom)[0] == 128

    def broken(batch):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        accelerator.first_fitting((256, 128), broken)  # other errors are not hidden by a smaller batch
    with pytest.raises(accelerator.NoBatchFits, match="no batch of"):
        accelerator.first_fitting((32, 16), lambda b: attempt(b * 100))


def test_ratios_and_goals_from_recorded_numbers():
    def mode(pairs, bt_flops, images, sup_flops):
        return {"barlow_twins": {"pairs_per_s": pairs, "flop_per_s": bt_flops},
                "supervised": {"images_per_s": images, "flop_per_s": sup_flops}}

    preset = accelerator.summarize({"modes": {"float32": mode(100, 10.0, 400, 20.0),
                                              "mixed_xla": mode(250, 25.0, 900, 30.0)}})
    fast = preset["modes"]["mixed_xla"]
    assert fast["bt_over_supervised_flops"] == pytest.approx(25 / 30)
    assert fast["over_float32"] == pytest.approx(2.5) and fast["supervised_over_float32"] == pytest.approx(900 / 400)
    goals = accelerator.goals({"imagenet": preset}, smoke=False)
    assert [(g["metric"], g["met"]) for g in goals] == [("bt_over_supervised_flops", True), ("over_float32", True)]
    preset["modes"]["mixed_xla"]["over_float32"] = 1.5
    assert [g["met"] for g in accelerator.goals({"imagenet": preset}, smoke=False)] == [True, False]
    assert [g["met"] for g in accelerator.goals({"imagenet": preset}, smoke=True)] == [None, None]
    assert [g["met"] for g in accelerator.goals({}, smoke=False)] == [None, None]  # not measured: no verdict

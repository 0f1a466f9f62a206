"""analyze and export on a real sweep folder: the shipped smoke sweep, run once by this module
through the CLI (real Ray, Optuna and an sqlite MLflow store)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.choose import choose, make_bounds, selection_objectives
from analysis.pareto import ConstraintError, nondominated_ranks
from analysis.results import load_ray, load_sweep, read_state
from prunevision_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
OBJ = {"val_accuracy": "max", "param_sparsity": "max", "latency_ms": "min"}  # what the shipped sweeps use
TEST_OBJ = {"accuracy": "max", "param_sparsity": "max", "latency_ms": "min"}  # sweeps from before val_split


@pytest.fixture
def sweep(smoke_sweep):  # conftest: run once per session, shared with tests/test_int8.py
    return smoke_sweep


@pytest.fixture
def tracking(sweep, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", read_state(sweep)["settings"]["tracking_uri"])
    return read_state(sweep)["settings"]


def test_three_sources_give_the_same_trials(sweep, tracking):
    ray_df = load_sweep(sweep, "ray")
    assert len(ray_df) == 4 and (ray_df["status"] == "complete").all()
    assert all((Path(d) / "pruned.safetensors").is_file() for d in ray_df["output_dir"])
    ml = load_sweep(sweep, "mlflow")
    op = load_sweep(sweep, "optuna")
    assert len(ml) == len(op) == 4
    a = ray_df.set_index("trial_id")[list(OBJ)].sort_index()
    b = ml.set_index("trial_id")[list(OBJ)].sort_index()
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6)
    # Optuna rows are matched to Ray trials by their sampled config
    assert op["output_dir"].notna().all()
    m = op.set_index("output_dir")[list(OBJ)].sort_index()
    np.testing.assert_allclose(m.to_numpy(), ray_df.set_index("output_dir")[list(OBJ)].sort_index().to_numpy(),
                               rtol=1e-6)
    assert any(c.startswith("config/gates.lam") for c in ray_df.columns)


def test_analyze_writes_report_and_logs_to_the_parent_run(sweep, tracking, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(sweep), "--out", str(out), "--runs", "5"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and str(out / "report.html") in printed
    for name in ("pareto.csv", "trials.csv", "report.md", "report.html", "front_2d.png", "front_3d.html",
                 "parallel_coordinates.png", "hypervolume.png", "importance.png", "chosen_gate_histogram.png",
                 "chosen_per_class_accuracy.png", "chosen_first_conv_filters.png",
                 "chosen_gate_histograms_over_training.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    front = pd.read_csv(out / "pareto.csv", dtype={"trial_id": str})
    done = trials[trials["status"] == "complete"].reset_index(drop=True)
    assert sorted(front["trial_id"]) == sorted(done[nondominated_ranks(done, OBJ) == 0]["trial_id"])
    # chosen on the validation split; the test accuracy is shown next to it
    assert list(front.columns[1:3]) == ["val_accuracy", "accuracy"] and front["accuracy"].notna().all()
    assert front["latency_remeasured"].all()  # the front's latency was measured again
    assert (front["latency_ms_trial"] > 0).all()
    for cmd in front["reproduce"]:  # each front point can be reproduced from a saved config
        assert Path(cmd.split()[2]).is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "<iframe srcdoc=" in html
    assert all(t in html for t in front["trial_id"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"complete": 4} and summary["hypervolume"] > 0
    assert summary["selection_accuracy"] == "val_accuracy" and summary["chosen"]["accuracy"] is not None
    md = (out / "report.md").read_text()
    assert "top-1 accuracy (validation, chosen on)" in md and "top-1 accuracy (test, reported)" in md
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking["tracking_uri"])
    names = {a.path for a in c.list_artifacts(tracking["parent_run_id"], "analysis")}
    assert {"analysis/report.html", "analysis/pareto.csv", "analysis/plots"} <= names
    run = c.get_run(tracking["parent_run_id"])
    assert run.data.metrics["analysis.front_size"] == len(front)
    assert run.data.tags["prunevision.chosen_trial"] == summary["chosen"]["trial_id"]


def test_export_verifies_writes_a_card_and_registers_champion(sweep, tracking, tmp_path, capsys):
    import mlflow
    import onnxruntime as ort

    out = tmp_path / "ship" / "model.onnx"
    assert main(["export", str(sweep), "--select", "max-accuracy", "--out", str(out), "--exporter", "torchscript",
                 "--registered-model", "smoke-model"]) == 0
    assert "alias @champion" in capsys.readouterr().out
    card = json.loads((out.parent / "model.json").read_text())
    df = load_ray(sweep).set_index("trial_id")
    # max-accuracy: the best validation accuracy (ties possible on a tiny split), not the best test accuracy
    assert df.loc[card["source"]["trial_id"], "val_accuracy"] == df["val_accuracy"].max()
    assert not card["source"]["retrained"] and card["selection"]["accuracy"] == "val_accuracy"
    assert {"val_accuracy", "accuracy"} <= set(card["metrics"])
    assert card["verification"]["passed"] and card["verification"]["max_abs_diff"] <= 1e-4
    assert card["verification"]["real_images"]
    assert card["source"]["mlflow_run_id"] and card["registry"]["version"] == "1"
    assert card["full_config"]["model"]["name"] == "small_cnn"
    size = card["input"]["size"]
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    direct = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert direct.shape == (2, 4)
    loaded = mlflow.pyfunc.load_model("models:/smoke-model@champion")
    pred = loaded.predict(x)
    pred = pred["logits"] if isinstance(pred, dict) else np.asarray(pred)
    np.testing.assert_allclose(np.asarray(pred), direct, atol=1e-5)
    # a second export moves the alias to the new version
    assert main(["export", str(sweep), "--select", "max-sparsity", "--out", str(tmp_path / "m2.onnx"),
                 "--exporter", "torchscript", "--registered-model", "smoke-model"]) == 0
    from mlflow.tracking import MlflowClient

    mv = MlflowClient(tracking["tracking_uri"]).get_model_version_by_alias("smoke-model", "champion")
    assert str(mv.version) == "2"
    assert json.loads((tmp_path / "m2.json").read_text())["registry"]["version"] == "2"


def test_export_ships_the_trial_the_analysis_chose(sweep, tracking, tmp_path, capsys):
    # the knee in the report, summary.json, model.json and the registered @champion are one trial,
    # even where the re-measured latencies move the knee away from the trials' own figures
    from mlflow.tracking import MlflowClient

    copy = tmp_path / "an"
    shutil.copytree(sweep, copy)
    shutil.rmtree(copy / "analysis", ignore_errors=True)
    assert main(["analyze", str(copy), "--runs", "5", "--no-mlflow"]) == 0
    summary_path = copy / "analysis" / "summary.json"
    summary = json.loads(summary_path.read_text())
    df = load_ray(copy)
    complete = df[df["status"] == "complete"]
    # make the analysis choose a trial the trials' latencies would not (as a re-measurement can)
    own = choose(df, selection_objectives(summary["sweep_objectives"], df), "knee", {})["trial_id"]
    other = next(t for t in complete["trial_id"] if t != own)
    summary["chosen"]["trial_id"] = other
    summary_path.write_text(json.dumps(summary))
    out = tmp_path / "ship" / "model.onnx"
    assert main(["export", str(copy), "--select", "knee", "--out", str(out), "--exporter", "torchscript",
                 "--registered-model", "knee-model"]) == 0
    card = json.loads((out.parent / "model.json").read_text())
    assert card["source"]["trial_id"] == other and card["selection"]["chosen_by"].startswith("analysis")
    mv = MlflowClient(tracking["tracking_uri"]).get_model_version_by_alias("knee-model", "champion")
    assert mv.tags["prunevision.source_trial"] == other
    # another selection than the analysis made: export chooses by itself
    assert main(["export", str(copy), "--select", "max-sparsity", "--out", str(tmp_path / "m2.onnx"),
                 "--exporter", "torchscript", "--no-register"]) == 0
    assert json.loads((tmp_path / "m2.json").read_text())["selection"]["chosen_by"] == "trial latencies"


def test_export_retrains_when_the_sweep_did_not_keep_the_model(sweep, tracking, tmp_path, capsys):
    copy = tmp_path / "an"
    shutil.copytree(sweep, copy)
    for p in copy.glob("*/checkpoint_*/pruned.safetensors"):
        p.unlink()
    out = tmp_path / "model.onnx"
    assert main(["export", str(copy), "--out", str(out), "--exporter", "torchscript", "--no-register"]) == 0
    assert "RETRAINING" in capsys.readouterr().out
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["source"]["retrained"] and card["verification"]["passed"] and "registry" not in card


def test_bad_requests_fail_with_one_line_before_work(sweep, tracking, tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "not a prunevision sweep folder" in capsys.readouterr().err
    assert main(["analyze", str(sweep), "--out", str(tmp_path / "a"), "--min-sparsity", "0.999"]) == 2
    err = capsys.readouterr().err
    assert "param_sparsity >= 0.999" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()  # failed before writing or re-measuring anything
    assert main(["export", str(sweep), "--out", str(tmp_path / "m.onnx"), "--min-accuracy", "90"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main(["export", str(sweep), "--out", str(tmp_path / "model.bin"), "--no-register"]) == 2
    assert ".onnx" in capsys.readouterr().err
    # an unreachable tracking server stops analyze before any work; the sweep folder is untouched
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    state = json.loads((copy / "prunevision_sweep.json").read_text())
    state["settings"]["tracking_uri"] = "http://127.0.0.1:9"
    (copy / "prunevision_sweep.json").write_text(json.dumps(state))
    assert main(["analyze", str(copy), "--out", str(tmp_path / "b")]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["analyze", str(copy), "--out", str(tmp_path / "b"), "--no-mlflow", "--no-remeasure"]) == 0


def test_unfinished_trials_are_counted_and_kept_off_the_front(sweep, tmp_path, capsys):
    # the same sweep, with one trial's final report cut off and another marked errored by Ray
    copy = tmp_path / "an"
    shutil.copytree(sweep, copy)
    results = sorted(copy.glob("*/result.json"))
    lines = results[0].read_text().splitlines()
    results[0].write_text("\n".join(lines[:-1]) + "\n")  # as if it had been stopped after its epochs
    state_file = sorted(copy.glob("experiment_state-*.json"))[-1]
    st = json.loads(state_file.read_text())
    victim = json.loads(results[1].read_text().splitlines()[-1])["trial_id"]
    for entry in st["trial_data"]:
        meta = json.loads(entry[0])
        if meta["trial_id"] == victim:
            meta["status"] = "ERROR"
            entry[0] = json.dumps(meta)
    state_file.write_text(json.dumps(st))
    # the errored trial's final line goes too
    lines = results[1].read_text().splitlines()
    results[1].write_text("\n".join(lines[:-1]) + "\n")
    df = load_ray(copy)
    assert sorted(df["status"]) == ["complete", "complete", "error", "stopped"]
    assert main(["analyze", str(copy), "--out", str(tmp_path / "a"), "--no-mlflow", "--no-remeasure"]) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["trials"] == {"complete": 2, "stopped": 1, "error": 1}
    front = pd.read_csv(tmp_path / "a" / "pareto.csv", dtype={"trial_id": str})
    assert set(front["trial_id"]) <= set(df[df["status"] == "complete"]["trial_id"])
    assert "1 error" in (tmp_path / "a" / "report.md").read_text()


def test_choose_strategies_and_bounds():
    OBJ = TEST_OBJ  # a sweep without a validation split: chosen on the test accuracy
    df = pd.DataFrame({"trial_id": list("abcde"), "status": ["complete"] * 4 + ["stopped"],
                       "accuracy": [0.9, 0.8, 0.7, 0.85, 0.99], "param_sparsity": [0.1, 0.5, 0.9, 0.5, 0.99],
                       "latency_ms": [3.0, 2.0, 1.0, 2.5, 0.1]})
    assert choose(df, OBJ, "max-accuracy")["trial_id"] == "a"  # the stopped trial never wins
    assert choose(df, OBJ, "min-latency")["trial_id"] == "c"
    assert choose(df, OBJ, "max-sparsity")["trial_id"] == "c"
    assert choose(df, OBJ, "max-accuracy", make_bounds(max_latency_ms=2.2))["trial_id"] == "b"
    assert choose(df, OBJ, "knee", make_bounds(min_sparsity=0.4))["trial_id"] in ("b", "c")
    with pytest.raises(ConstraintError, match="latency_ms <= 0.5"):
        choose(df, OBJ, "knee", make_bounds(max_latency_ms=0.5))
    with pytest.raises(ConstraintError, match="fraction"):
        make_bounds(min_accuracy=85)


def test_choose_on_val_accuracy_when_the_trials_report_it():
    from analysis.choose import accuracy_column, selection_objectives

    df = pd.DataFrame({"trial_id": list("abcd"), "status": ["complete"] * 4,
                       "val_accuracy": [0.80, 0.90, 0.70, 0.85], "accuracy": [0.95, 0.80, 0.70, 0.90],
                       "param_sparsity": [0.5, 0.5, 0.9, 0.6], "latency_ms": [2.0, 2.0, 1.0, 1.8]})
    assert accuracy_column(df) == "val_accuracy" and accuracy_column(df.drop(columns="val_accuracy")) == "accuracy"
    assert choose(df, OBJ, "max-accuracy")["trial_id"] == "b"  # the best test accuracy (a) is not chosen
    # an old sweep file's test-accuracy objective is read as val_accuracy where the trials report it
    assert selection_objectives(TEST_OBJ, df) == OBJ and list(selection_objectives(TEST_OBJ, df)) == list(OBJ)
    assert choose(df, TEST_OBJ, "max-accuracy")["trial_id"] == "b"
    assert choose(df, TEST_OBJ, "knee")["trial_id"] == choose(df, OBJ, "knee")["trial_id"]
    # --min-accuracy bounds the validation accuracy: only b (0.90) passes 0.88, though a and d pass on test
    assert choose(df, OBJ, "max-sparsity", make_bounds(min_accuracy=0.88))["trial_id"] == "b"
    with pytest.raises(ConstraintError, match="val_accuracy >= 0.95"):
        choose(df, OBJ, "knee", make_bounds(min_accuracy=0.95))
    # without val_accuracy (older sweeps) everything falls back to the test accuracy
    old = df.drop(columns="val_accuracy")
    assert choose(old, TEST_OBJ, "max-accuracy")["trial_id"] == "a"
    assert choose(old, TEST_OBJ, "max-sparsity", make_bounds(min_accuracy=0.88))["trial_id"] == "d"


def test_frontier_quality_benchmark_smoke(sweep, tracking, tmp_path):
    out = tmp_path / "fq.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontier_quality.py"), str(sweep), "--smoke-test",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["baselines"]) == 1 and 0 <= res["dense_accuracy_mean"] <= 1
    assert "dense" in res["latency"] and len(res["rows"]) >= 1


def test_leaderboard_by_method(tmp_path):
    from analysis.plots import leaderboard

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"trial_id": [f"t{i}" for i in range(9)], "status": ["complete"] * 8 + ["error"],
                       "config/prune.method": ["gate", "ocap", "lrp"] * 3,
                       "accuracy": rng.uniform(0.5, 0.9, 9), "param_sparsity": rng.uniform(0, 0.9, 9),
                       "latency_ms": rng.uniform(0.1, 1, 9), "latency_speedup": rng.uniform(1, 4, 9)})
    assert leaderboard(df, OBJ, tmp_path / "lb.png").stat().st_size > 5000
    assert leaderboard(df.assign(**{"config/prune.method": "gate"}), OBJ, tmp_path / "one.png") is None

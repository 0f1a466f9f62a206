import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prune_latency_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prune_latency.py"), "--smoke-test",
                        "--exporter", "torchscript", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["models"]["mobilenet_v3_small"]
    assert set(rows) == {"dense", "pruned_50", "masked_50"}
    assert rows["pruned_50"]["macs"] < rows["dense"]["macs"]
    assert rows["masked_50"]["macs"] == rows["dense"]["macs"]  # masks change no shapes
    assert rows["masked_50"]["zero_fraction"] > 0.45
    assert rows["dense"]["ort_b1"]["runs"] >= 30 and rows["dense"]["torch_b1"]["runs"] >= 30


def _run(args, tmp_path, timeout=600):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_trial_time_benchmark_smoke(tmp_path):
    out = tmp_path / "t.json"
    md = tmp_path / "RESULTS.md"
    printed = _run([str(ROOT / "benchmarks" / "trial_time.py"), "--smoke-test", "--out", str(out),
                    "--results-md", str(md)], tmp_path)
    res = json.loads(out.read_text())
    for k in ("data_load_s", "train_s", "prune_s", "finetune_s", "evaluate_s", "measure_s", "export_s"):
        assert res["timings"][k] >= 0, k
    assert res["timings"]["train_s"] > 0 and res["timings"]["export_s"] > 0
    assert res["loader_images_per_s"] > 0 and res["train_images_per_s"] > 0
    assert "whole trial" in printed and not md.exists()  # smoke runs append nothing


@pytest.mark.slow
def test_search_efficiency_benchmark_smoke(tmp_path):
    out = tmp_path / "s.json"
    _run([str(ROOT / "benchmarks" / "search_efficiency.py"), "--smoke-test", "--samplers", "tpe,random",
          "--jobs", "1", "--out", str(out), "--results-md", ""], tmp_path)
    res = json.loads(out.read_text())
    assert {r["sampler"] for r in res["runs"]} == {"tpe", "random"}
    for r in res["runs"]:
        hv = r["hypervolume"]
        assert len(hv) == 3 and all(b >= a for a, b in zip(hv, hv[1:]))  # hypervolume never falls
        assert all(0 <= t["values"][0] <= 1 and 0 < t["values"][2] <= 1 for t in r["trials"])
    # the pooled front of every study's trials covers at least what each study reached
    assert res["pooled"]["trials"] == 6
    assert res["pooled"]["hypervolume"] >= max(r["hypervolume"][-1] for r in res["runs"]) - 1e-12


def test_search_efficiency_pooled_front_bounds_every_sampler():
    sys.path.insert(0, str(ROOT))
    from benchmarks.search_efficiency import summarize

    def study(sampler, values):
        return {"sampler": sampler, "seed": 0, "trials": [{"values": v} for v in values]}

    # (accuracy, parameter sparsity, MACs share); reference point (0, 0, 1): boxes 0.5·0.5·0.5 and
    # 0.25·1·0.5 that overlap in 0.25·0.5·0.5, so together 0.125 + 0.125 − 0.0625
    results = [study("random", [(0.5, 0.5, 0.5)]), study("tpe", [(0.25, 1.0, 0.5)])]
    summary, pooled = summarize(results, ["tpe", "random"], 1)
    assert summary["random"][1] == pytest.approx((0.125, 0.0))
    assert summary["tpe"][1] == pytest.approx((0.125, 0.0))
    assert pooled["trials"] == 2
    assert pooled["hypervolume"] == pytest.approx(0.1875)
    assert pooled["vs_random"] == pytest.approx(1.5)


@pytest.mark.slow
def test_budget_control_benchmark_smoke(tmp_path):
    out = tmp_path / "b.json"
    md = tmp_path / "RESULTS.md"
    _run([str(ROOT / "benchmarks" / "budget_control.py"), "--smoke-test", "--budgets", "0.5", "--out", str(out),
          "--results-md", str(md)], tmp_path)
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["budget"] == 0.5 and 0 < run["achieved"] <= 1
    assert abs(run["pruned"] - run["gated"]) < 1e-9  # hard gates: the gated network is the pruned one
    assert not md.exists()


@pytest.mark.parametrize("script", ["gate_decomposition.py", "budget_control.py", "latency_budget.py"])
def test_benchmark_with_a_corrupt_dataset_says_so_in_one_line(tmp_path, script):
    bad = tmp_path / "cifar.tar.gz"
    bad.write_text("not an archive")
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--data", str(bad), "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"{script}: error: data.root: {bad} is neither a folder nor a .tar/.tar.gz archive"
    assert not out.exists()


@pytest.mark.slow
def test_gate_decomposition_benchmark_smoke(tmp_path):
    out = tmp_path / "d.jsonl"
    args = [str(ROOT / "benchmarks" / "gate_decomposition.py"), "--smoke-test", "--out", str(out)]
    _run(args, tmp_path)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    # Taylor and L1 pruned the dense network to exactly the gate run's widths (the script asserts it too)
    assert row["gate_widths"][-1] == row["uniform_widths"][-1] == 4  # the classifier keeps every class
    assert row["gate_widths"] != row["uniform_widths"]
    assert 0.4 <= row["gate_share"] <= 0.6 and 0.4 <= row["uniform_share"] <= 0.55
    for k in ("gate", "dense", "uniform", "taylor_at_gate_widths", "l1_at_gate_widths"):
        assert 0 <= row[k] <= 1, k
    printed = _run(args + ["--variant", "default"], tmp_path)  # the same row is not run twice
    assert "already" in printed and len(out.read_text().splitlines()) == 1
    _run(args + ["--variant", "centred", "--no-baselines"], tmp_path)
    _run(args + ["--variant", "taylor_gradual", "--no-baselines"], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["default", "centred", "taylor_gradual"] and "uniform" not in rows[1]
    # the schedule control keeps one ratio in every layer: the widths of Taylor at one ratio, give or take
    # the rounding of the two bisections (one on torch-pruning's ratio, one on the MACs model's)
    for w, u, n in zip(rows[2]["gate_widths"], row["uniform_widths"], (32, 64, 256, 4)):
        assert abs(w - u) <= 0.05 * n, (rows[2]["gate_widths"], row["uniform_widths"])
    assert rows[2]["gate_widths"] != rows[0]["gate_widths"]


@pytest.mark.slow
def test_int8_benchmark_smoke(tmp_path):
    out = tmp_path / "int8.json"
    md = tmp_path / "RESULTS.md"
    printed = _run([str(ROOT / "benchmarks" / "int8.py"), "--smoke-test", "--out", str(out), "--results-md",
                    str(md)], tmp_path)
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["runs"]] == ["knee", "resnet18"]
    for r in res["runs"]:
        q = r["int8"]
        assert q["shipped"] and q["structure"]["quantized_weight_layers"] == q["structure"]["weight_layers"] > 0
        assert q["size"]["ratio"] > 3 and set(q["latency"]) == {"batch_1", "batch_8"}
        assert {"val", "test"} <= set(q["accuracy"]) and 0 <= q["accuracy"]["test"]["int8"] <= 1
        assert q["latency"]["batch_1"]["int8"]["p10_ms"] <= q["latency"]["batch_1"]["int8"]["p90_ms"]
    assert "b1 speed-up" in printed and not md.exists()  # smoke runs append nothing


# Runs a script with Ray, MLflow and pandas unimportable, as on a machine without them (None in
# sys.modules: `import` raises ModuleNotFoundError and importlib.util.find_spec answers None).
WITHOUT_RAY = """
import runpy, sys

for name in ('ray', 'mlflow', 'pandas'):
    sys.modules[name] = None
try:
    import ray  # noqa: F401
    sys.exit('the import blocker does not work')
except ImportError:
    pass
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.mark.slow
def test_gpu_trial_benchmark_smoke_runs_without_ray_or_mlflow(tmp_path):
    out = tmp_path / "g.json"
    md = tmp_path / "RESULTS.md"
    printed = _run(["-c", WITHOUT_RAY, str(ROOT / "benchmarks" / "gpu_trial.py"), "--smoke-test", "--out", str(out),
                    "--results-md", str(md)], tmp_path)
    (res,) = json.loads(out.read_text())["runs"]
    assert res["device"] == "cpu" and res["epochs"] == 1 and res["train_s"] > 0 and res["images_per_s"] > 0
    assert 0 <= res["accuracy_dense"] <= 1 and 0 <= res["accuracy_pruned"] <= 1 and res["macs_share"] < 1
    assert set(res["latency"]) == {"fp32_b1", "fp32_b8"}  # no bf16 rows without a GPU
    for k, v in res["latency"].items():
        assert v["dense"]["timer"] == "perf_counter" and v["dense"]["runs"] >= 10
        assert 0 < v["pruned"]["p10_ms"] <= v["pruned"]["median_ms"] <= v["pruned"]["p90_ms"]
        assert res["speedup"][k] == v["dense"]["median_ms"] / v["pruned"]["median_ms"]
    assert res["gpu_utilisation_training"]["samples"] == 0  # nothing to sample on a CPU
    assert "training throughput" in printed and not md.exists()  # smoke runs append nothing


def test_search_efficiency_summarizes_a_raw_file_and_refuses_anything_else(tmp_path):
    raw = {"runs": [{"sampler": "random", "seed": 0, "trials": [{"values": [0.5, 0.5, 0.5]}]},
                    {"sampler": "tpe", "seed": 0, "trials": [{"values": [0.25, 1.0, 0.5]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(raw))
    out = _run([str(ROOT / "benchmarks" / "search_efficiency.py"), "--summarize", str(tmp_path / "s.json")], tmp_path)
    assert "pooled front of all 2 trials: hypervolume 0.1875, 1.50x random" in out
    (tmp_path / "bad.json").write_text("{not json")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"), "--summarize",
                        str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "is not a search_efficiency results file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_latency_budget_benchmark_smoke(tmp_path):
    out = tmp_path / "l.json"
    _run([str(ROOT / "benchmarks" / "latency_budget.py"), "--smoke-test", "--out", str(out), "--results-md", ""],
         tmp_path)
    (run,) = json.loads(out.read_text())["runs"]
    assert run["target_ms"] == pytest.approx(0.8 * run["dense_ms_before"])
    # training timed the structure it landed on (the model's prediction is where that structure sits in the
    # model, not the request: the clock chose it)
    assert run["landed_ms"] > 0 and run["predicted_ms"] > 0
    assert run["latency_ms"] > 0 and run["latency_ms_p10"] <= run["latency_ms"] <= run["latency_ms_p90"]
    assert run["error"] == pytest.approx(run["latency_ms"] / run["target_ms"] - 1)

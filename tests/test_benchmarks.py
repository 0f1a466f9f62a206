import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

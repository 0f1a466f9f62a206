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
    assert rows["dense"]["b1"]["runs"] >= 30

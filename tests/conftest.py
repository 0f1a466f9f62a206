import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests run on 2 cores next to each other; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


ROOT = Path(__file__).resolve().parents[1]


def sweep_env(tmp: Path) -> dict:
    """The environment of a sweep subprocess: an sqlite MLflow store in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    return env


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """The shipped smoke sweep, run once per session through the CLI (real Ray, Optuna and an sqlite
    MLflow store); shared by the analysis and INT8 tests, which copy it before changing anything."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "-m", "prunevision_cli", "sweep", "run", str(ROOT / "sweeps" / "configs" / "smoke.yaml"),
           "--smoke-test", "--storage", str(tmp / "runs"), "--num-cpus", "2", "--set", "name=an"]
    r = subprocess.run(cmd, cwd=tmp, env=sweep_env(tmp), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "runs" / "an"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test decodes into its own cache folder, never the user's."""
    monkeypatch.setenv("PRUNEVISION_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_imagefolder(root: Path, classes=("cat", "dog", "frog"), per_class=6, size=16, splits=("train", "test")):
    """A tiny ImageFolder tree of PNG files whose colour depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                base = np.zeros((size, size, 3), dtype=np.uint8)
                base[..., i % 3] = 200
                img = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{j:04d}.png")
    return root


def write_cifar_batches(root: Path, n_per_batch=20, n_test=30) -> Path:
    """torchvision-format CIFAR-10 python batch files (pickled dicts of numpy arrays)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"labels": [int(v) for v in rng.integers(0, 10, n)], b"batch_label": b"x"}

    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_per_batch), f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    return d


def pytest_collection_modifyitems(items):
    """Tests on the shared smoke sweep (a real Ray sweep in a subprocess) are slow: make test-fast
    leaves them out, make test runs them."""
    for item in items:
        if "smoke_sweep" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)

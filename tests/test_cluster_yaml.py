from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_with_rays_schema():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0  # no GPU on the head
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > t["min_workers"] for t in types.values())
    assert any("requirements.txt" in c for c in cfg["setup_commands"])


def test_the_cluster_starts_ray_as_the_job_recipe_needs():
    """What README's cluster recipe relies on: Ray's job server and client installed, Ray started
    from the venv (jobs find `prunevision`), token auth with the launching machine's token, and
    the tracking server in the environment jobs and trials inherit."""
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    reqs = (ROOT / "requirements.txt").read_text()
    ray_line = next(line for line in reqs.splitlines() if line.startswith("ray["))
    assert {"default", "tune", "client"} <= set(ray_line[4:ray_line.index("]")].split(","))
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    # `prunevision` (the project's console script) lands in the venv whose bin/ Ray starts with
    assert any(".venv/bin/uv pip install" in c and "-r requirements.txt -e ." in c for c in cfg["setup_commands"])
    server = next(c for c in cfg["head_setup_commands"] if "mlflow server" in c)
    if "s3://" in server:  # an S3 artifact store needs boto3 next to the server
        assert any("boto3" in c for c in cfg["head_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in cfg[key] if "ray start" in c]
        assert "PATH=/home/ubuntu/prunevision/.venv/bin:$PATH" in start and "RAY_AUTH_MODE=token" in start
        assert "MLFLOW_TRACKING_URI=http://" in start


def test_a_broken_cluster_yaml_is_rejected():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["max_workerz"] = 3
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(cfg))


def test_the_hybrid_sweep_fits_the_clusters_gpu_workers():
    """cifar10_hybrid.yaml's resources per trial pack onto cluster.yaml's GPU workers as meant: the
    GPU share sets how many trials a worker runs and its CPUs do not cut that number."""
    from sweeps.run import trials_per_node
    from sweeps.spec import load_sweep

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    spec = load_sweep(ROOT / "sweeps" / "configs" / "cifar10_hybrid.yaml")
    res = spec.resources
    gpu_types = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types and 0 < res["gpu"] <= 1
    for name, t in gpu_types.items():
        node = t["resources"]
        per_gpu = trials_per_node({"cpu": 1e-4, "gpu": res["gpu"]}, {"CPU": 1, "GPU": 1})
        assert trials_per_node(res, node) == node["GPU"] * per_gpu >= 2, name  # the CPUs leave the GPU packing whole
        assert spec.max_concurrent <= trials_per_node(res, node) * t["max_workers"], name  # the cluster can host them
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    assert trials_per_node(res, head) == 0  # trials never land on the head
    assert spec.base_config().train.device == "auto"  # each trial takes the GPU Ray assigns it

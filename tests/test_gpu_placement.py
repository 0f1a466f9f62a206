"""Fractional GPUs and device placement, proven on a Ray cluster whose nodes declare GPUs.

No GPU is needed: Ray schedules GPUs as logical resources and gives each trial GPU ids
(``ray.get_gpu_ids()``, ``CUDA_VISIBLE_DEVICES``) whether or not CUDA is there. Without CUDA a
trial that Ray gave a GPU trains on the CPU and records that truthfully (``device: cpu`` next to its
``gpu_ids``). The cluster (loopback only) has a head without CPUs or GPUs, like cluster.yaml's,
and 1 or 2 worker nodes of 4 CPUs and 1 GPU each; the trials are the smallest the pipeline runs.
"""

import json
import os
from pathlib import Path

import pytest
import ray
import torch
from trial_wrappers import held_until_peers

from sweeps.placement import PlacementError, cuda_index, current_placement, trial_device
from sweeps.run import build_tuner, check_resources, finish, prepare, trials_per_node
from sweeps.spec import SweepError, parse_sweep
from sweeps.tracking import child_runs, client

BASE = {
    "model": {"name": "small_cnn"},
    "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "batch_size": 32,
             "eval_batch_size": 32, "num_classes": 4, "image_size": 16},
    "train": {"epochs": 1, "lr": 0.05},
    "measure": {"enabled": False},  # placement is what is tested here, not pruning
}
SPACE = {"gates.lam": {"type": "loguniform", "low": 0.05, "high": 5.0}}


def make_spec(name, gpu, n, conc, cpu=1, **base_over):
    base = json.loads(json.dumps(BASE))
    for k, v in base_over.items():
        base.setdefault(k.split(".")[0], {})[k.split(".")[1]] = v
    return parse_sweep({"name": name, "base": base, "space": SPACE, "objectives": {"val_accuracy": "max"},
                        "search": {"num_samples": n, "max_concurrent": conc, "seed": 0},
                        "resources": {"cpu": cpu, "gpu": gpu}, "mlflow": {"experiment": f"gpu-{name}"}})


# -- the device a trial trains on: pure decisions -----------------------------------------------
def test_auto_takes_the_gpu_ray_assigned_and_only_that_one():
    assert trial_device("auto", [3], True, "3") == "cuda:0"  # Ray's CUDA_VISIBLE_DEVICES: cuda:0 is GPU 3
    assert trial_device("auto", ["2", "3"], True, "2,3") == "cuda:0"
    assert trial_device("auto", [3], True, None) == "cuda:3"  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    assert cuda_index("3", "1,3") == 1
    with pytest.raises(PlacementError, match="not among the GPUs torch can see"):
        cuda_index(5, "0,1")


def test_a_trial_without_a_gpu_trains_on_the_cpu_even_where_cuda_sees_gpus():
    # Ray leaves CUDA_VISIBLE_DEVICES alone for gpu-0 trials: every GPU of the node is visible
    assert trial_device("auto", [], True, None) == "cpu"
    assert trial_device("auto", [], True, "0,1,2,3") == "cpu"
    assert trial_device("auto", [0], False, "0") == "cpu"  # a declared GPU CUDA cannot see
    assert trial_device("cpu", [0], True, "0") == "cpu"


def test_an_explicit_cuda_device_counts_the_trials_own_gpus():
    assert trial_device("cuda", [5], True, "5") == "cuda:0"
    assert trial_device("cuda:1", [4, 6], True, "4,6") == "cuda:1"
    with pytest.raises(PlacementError, match="assigned this trial 0 GPU.*resources.gpu"):
        trial_device("cuda", [], True, None)
    with pytest.raises(PlacementError, match="2 GPUs with resources.gpu"):
        trial_device("cuda:1", [0], True, "0")
    with pytest.raises(PlacementError, match="CUDA sees no GPU"):
        trial_device("cuda", [0], False, "0")


def test_sweep_files_asking_for_gpus_ray_cannot_give_stop_before_ray():
    with pytest.raises(SweepError, match=r"resources.gpu: 1.5: a share of one GPU"):
        make_spec("frac", gpu=1.5, n=1, conc=1)
    with pytest.raises(SweepError, match=r"train.device=cuda needs 1 GPU\(s\) per trial but resources.gpu is 0"):
        make_spec("nogpu", gpu=0, n=1, conc=1, **{"train.device": "cuda"})
    with pytest.raises(SweepError, match=r"train.device=cuda:1 needs 2 GPU"):
        make_spec("share", gpu=0.5, n=1, conc=1, **{"train.device": "cuda:1"})
    make_spec("two", gpu=2, n=1, conc=1, **{"train.device": "cuda:1"})  # fits


def test_trials_per_node_counts_like_ray():
    node = {"CPU": 8.0, "GPU": 1.0, "memory": 1e9}
    assert trials_per_node({"cpu": 1, "gpu": 0.25}, node) == 4
    assert trials_per_node({"cpu": 1, "gpu": 0.1}, node) == 8  # 1/0.1 in Ray's fixed point, not 9.999…
    assert trials_per_node({"cpu": 4, "gpu": 0.25}, node) == 2  # the CPUs cut the packing
    assert trials_per_node({"cpu": 1, "gpu": 0}, {"CPU": 3}) == 3
    assert trials_per_node({"cpu": 1, "gpu": 2}, node) == 0


# -- a cluster that declares GPUs ---------------------------------------------------------------
class GpuCluster:
    """A head without CPUs or GPUs (like cluster.yaml's) and worker nodes of 4 CPUs and 1 GPU (Ray
    starts one idle worker process per CPU on a node: few CPUs keep the node cheap)."""

    def __init__(self, root: Path):
        from ray.cluster_utils import Cluster

        self.root = root
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "include_dashboard": False, "object_store_memory": 80 * 2**20})
        self.workers = []
        ray.init(address=self.cluster.address)

    def gpu_nodes(self, n: int) -> list[str]:
        """Exactly ``n`` GPU worker nodes; returns their Ray node ids."""
        while len(self.workers) < n:
            self.workers.append(self.cluster.add_node(num_cpus=4, num_gpus=1, object_store_memory=80 * 2**20))
        while len(self.workers) > n:
            self.cluster.remove_node(self.workers.pop())
        self.cluster.wait_for_nodes()
        return [w.node_id for w in self.workers]

    def shutdown(self):
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-cluster")
    from ray._private import ray_constants

    with pytest.MonkeyPatch.context() as mp:
        # loopback only (as sweeps.run does for a local Ray): nodes, workers and this driver
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        c = GpuCluster(root)
        try:
            yield c
        finally:
            c.shutdown()


def run_held(spec, root, peers):
    """The sweep through sweeps.run, each trial held at its start until ``peers`` trials have
    started (tests/trial_wrappers.py): trials released together ran side by side."""
    state = prepare(spec, root / "runs")
    check_resources(state)
    summary = finish(state, build_tuner(spec, state, trial_fn=held_until_peers(root / f"peers-{spec.name}",
                                                                              peers)).fit())
    assert summary["errors"] == 0 and len(summary["trials"]) == spec.num_samples
    trials = []
    for t in summary["trials"]:
        assert t["final"], t
        final = json.loads((Path(t["trial_dir"]) / "result.json").read_text().splitlines()[-1])
        ckpt = sorted(Path(t["trial_dir"]).glob("checkpoint_*"))[-1]
        trials.append({"result": final, "metrics": json.loads((ckpt / "metrics.json").read_text())})
    return summary, trials


def max_overlap(intervals):
    """The most intervals (start, end) running at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def check_recorded_placement(trials, gpu_nodes):
    """Each trial recorded the assignment Ray made: a GPU node, the GPU ids Ray gave it (the ones
    Ray put in its CUDA_VISIBLE_DEVICES) and the device it really trained on."""
    expect_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    for t in trials:
        r, m = t["result"], t["metrics"]
        assert r["node_id"] in gpu_nodes and r["gpu_ids"] == [0] and r["device"] == expect_device
        assert (m["node_id"], m["gpu_ids"], m["device"]) == (r["node_id"], r["gpu_ids"], r["device"])
        assert m["cuda_visible_devices"] == ",".join(str(g) for g in r["gpu_ids"])  # set by Ray, not by us
        assert r["span"]["started_at"] < r["span"]["finished_at"]


@pytest.mark.slow
def test_four_trials_share_one_gpu_and_a_fifth_waits(gpu_cluster):
    (node,) = gpu_cluster.gpu_nodes(1)
    spec = make_spec("quarter", gpu=0.25, n=5, conc=5, cpu=0.5)  # the CPUs would take 8: the GPU limits
    summary, trials = run_held(spec, gpu_cluster.root, peers=4)
    check_recorded_placement(trials, {node})
    spans = sorted((t["result"]["span"]["started_at"], t["result"]["span"]["finished_at"]) for t in trials)
    first4, fifth = spans[:4], spans[4]
    assert max(s for s, _ in first4) < min(e for _, e in first4)  # the four ran at the same time
    assert fifth[0] >= min(e for _, e in first4)  # the fifth waited for a quarter of the GPU
    assert max_overlap(spans) == 4
    c = client(summary["tracking_uri"])
    kids = child_runs(c, summary["experiment_id"], summary["parent_run_id"])
    assert len(kids) == 5
    for k in kids:  # MLflow params: where the trial ran
        assert k.data.params["node_id"] == node and json.loads(k.data.params["gpu_ids"]) == [0]
        assert k.data.params["device"] in ("cpu", "cuda:0")


@pytest.mark.slow
def test_half_gpu_trials_spread_over_two_gpu_nodes_two_per_gpu(gpu_cluster):
    nodes = gpu_cluster.gpu_nodes(2)
    spec = make_spec("halves", gpu=0.5, n=4, conc=4)
    _, trials = run_held(spec, gpu_cluster.root, peers=4)  # four at once need both GPUs
    check_recorded_placement(trials, set(nodes))
    by_gpu = {}
    for t in trials:
        r = t["result"]
        by_gpu.setdefault((r["node_id"], r["gpu_ids"][0]), []).append((r["span"]["started_at"],
                                                                        r["span"]["finished_at"]))
    assert set(n for n, _ in by_gpu) == set(nodes)  # trials landed on both nodes
    assert all(max_overlap(spans) <= 2 for spans in by_gpu.values())  # never more than two per GPU
    assert max_overlap([s for spans in by_gpu.values() for s in spans]) == 4


@pytest.mark.slow
def test_work_without_a_gpu_on_a_gpu_node_gets_no_gpu_and_the_cpu(gpu_cluster):
    """What the trainable sees (sweeps.placement.current_placement) in a Ray worker on a GPU node."""
    (node,) = gpu_cluster.gpu_nodes(1)
    no_gpu = ray.get(ray.remote(num_cpus=0.5, num_gpus=0)(current_placement).remote("auto"))
    quarter = ray.get(ray.remote(num_cpus=0.5, num_gpus=0.25)(current_placement).remote("auto"))
    assert no_gpu["node_id"] == node and no_gpu["gpu_ids"] == [] and no_gpu["device"] == "cpu"
    # Ray leaves CUDA_VISIBLE_DEVICES as the node had it for gpu-0 work (on a real GPU node: every
    # GPU visible), which is why the CPU is chosen explicitly
    assert no_gpu["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert quarter["gpu_ids"] == [0] and quarter["cuda_visible_devices"] == "0"
    assert quarter["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_a_sweep_asking_more_than_any_node_has_is_refused_in_one_line(gpu_cluster, capsys):
    from prunevision_cli.main import main

    gpu_cluster.gpu_nodes(1)
    root = gpu_cluster.root
    sweep = root / "too_big.yaml"
    import yaml

    sweep.write_text(yaml.safe_dump({"name": "too_big", "base": BASE, "space": SPACE,
                                     "objectives": {"val_accuracy": "max"}, "resources": {"cpu": 1, "gpu": 2},
                                     "mlflow": {"experiment": "gpu-too-big"}}))
    capsys.readouterr()
    code = main(["sweep", "run", str(sweep), "--address", gpu_cluster.cluster.address, "--storage", str(root / "runs")])
    # (MLflow logs its own lines when it creates a new sqlite store: not ours)
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and " INFO mlflow" not in line and " INFO alembic" not in line]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prunevision: error: resources: each trial asks for 1 CPU and 2 GPU")
    assert "4 CPU + 1 GPU" in err[0]
    sweep_dir = root / "runs" / "too_big"
    assert not (sweep_dir / "optuna.db").exists() and not list(sweep_dir.glob("*/result.json"))  # nothing queued
    assert not sweep_dir.exists()  # nothing started: the same command runs again once resources are fixed
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    (parent,) = c.search_runs([c.get_experiment_by_name("gpu-too-big").experiment_id])
    assert parent.info.status == "FAILED"
    # too many CPUs per trial: refused the same way
    with pytest.raises(SweepError, match="asks for 16 CPU and 0 GPU"):
        check_resources({"run": {"resources": {"cpu": 16, "gpu": 0}}})


@pytest.mark.slow
def test_node_types_an_autoscaler_can_start_count(gpu_cluster, monkeypatch):
    """On a `ray up` cluster the GPU workers may not be up yet: the node types of the head's
    bootstrap config (read on the head) count as nodes."""
    import yaml

    import sweeps.run

    gpu_cluster.gpu_nodes(1)
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"] = {"CPU": 48, "GPU": 4}  # e.g. g5.12xlarge
    boot = gpu_cluster.root / "ray_bootstrap_config.yaml"
    boot.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sweeps.run, "BOOTSTRAP_CONFIG", str(boot))
    check_resources({"run": {"resources": {"cpu": 8, "gpu": 2}}})  # no node has it, the autoscaler can start one
    with pytest.raises(SweepError, match="asks for 8 CPU and 8 GPU"):
        check_resources({"run": {"resources": {"cpu": 8, "gpu": 8}}})
    del cfg["available_node_types"]["gpu_worker"]["resources"]  # left to the autoscaler to detect: not refused
    boot.write_text(yaml.safe_dump(cfg))
    check_resources({"run": {"resources": {"cpu": 8, "gpu": 8}}})

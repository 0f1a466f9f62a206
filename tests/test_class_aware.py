"""Class subsets, class-aware pruning (ocap, lrp), multi-ratio runs, GTSRB and the diagnostics."""

import copy
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from prunevision.checkpoint import load_pruned, save_pruned
from prunevision.config import DataConfig, GateConfig, ModelConfig, from_dict
from prunevision.data import DatasetError, load_dataset
from prunevision.export import export_onnx
from prunevision.measure import macs_and_params
from prunevision.models import build_gated_model
from prunevision.pipeline import run_training
from prunevision.prune import _scored_layers, class_aware_scores, first_convs, prune_step, prune_structured, strip_gates

SIZE = 32
SMOKE = {"data": {"name": "synthetic", "num_classes": 5, "synthetic_train": 160, "synthetic_test": 80,
                  "batch_size": 32, "eval_batch_size": 80, "image_size": 16},
         "train": {"epochs": 1}, "prune": {"finetune_epochs": 1},
         "measure": {"exporter": "torchscript", "torch_latency": False, "warmup": 1, "batch": 2}}


@pytest.mark.slow
def test_class_subset_renumbers_and_the_head_outputs_only_those_classes(tmp_path):
    # no validation split: the selected training images are exactly the full set's of those classes
    full = load_dataset(DataConfig(name="synthetic", num_classes=5, synthetic_train=100, synthetic_test=50,
                                   val_split=0))
    sub = load_dataset(DataConfig(name="synthetic", num_classes=5, synthetic_train=100, synthetic_test=50,
                                  classes=("class_3", "1"), val_split=0))  # by name and by index
    assert sub.classes == ("class_3", "class_1") and sub.num_classes == 2
    assert len(sub.train_y) == int(((full.train_y == 3) | (full.train_y == 1)).sum())
    assert set(sub.train_y.tolist()) == {0, 1}
    assert torch.equal(sub.train_x[sub.train_y == 0], full.train_x[full.train_y == 3])
    keep = load_dataset(DataConfig(name="synthetic", num_classes=5, synthetic_train=100, synthetic_test=50,
                                   classes=("class_3", "class_1"), class_head="full"))
    assert keep.num_classes == 5 and set(keep.test_y.tolist()) == {1, 3}
    with pytest.raises(DatasetError, match="did you mean 'class_2'"):
        load_dataset(DataConfig(name="synthetic", num_classes=5, classes=("class_2x", "class_1")))

    cfg = from_dict(SMOKE, {"data.classes": ["class_0", "class_4", "class_2"]})
    m = run_training(cfg, tmp_path, log=None)
    assert list(m["per_class_accuracy"]) == ["class_0", "class_4", "class_2"]
    assert m["dataset"]["classes"] == ["class_0", "class_4", "class_2"]
    model = load_pruned(tmp_path / "pruned.safetensors")
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    m = run_training(cfg.replace(**{"data.class_head": "full"}), tmp_path / "full", log=None)
    assert list(m["per_class_accuracy"]) == ["class_0", "class_4", "class_2"]  # only the selected ones reported
    assert load_pruned(tmp_path / "full" / "pruned.safetensors")(torch.zeros(1, 3, 16, 16)).shape == (1, 5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ocap", "lrp"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_class_aware_scores_prune_for_real(method, name, tmp_path):
    torch.manual_seed(0)
    model = strip_gates(build_gated_model(ModelConfig(name=name, small_input=True), GateConfig(), 4, SIZE)).eval()
    calib = [(torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 4, (8,))) for _ in range(2)]
    scores = class_aware_scores(model, method, calib)
    layers = _scored_layers(model)
    assert set(scores) == set(layers)  # every norm layer (or bare conv) gets scores ...
    for layer in layers:  # ... one per channel, finite and not all equal
        n = layer.num_features if hasattr(layer, "num_features") else layer.out_channels
        assert scores[layer].shape == (n,) and torch.isfinite(scores[layer]).all()
    assert any(s.std() > 0 for s in scores.values())
    macs0, params0 = macs_and_params(model, SIZE)
    prune_structured(model, torch.zeros(1, 3, SIZE, SIZE), method, 0.5, calibration=calib, round_to=8)
    macs1, params1 = macs_and_params(model, SIZE)
    assert params1 < 0.8 * params0 and macs1 < macs0
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 4)
    r = export_onnx(model, tmp_path / "m.onnx", SIZE, exporter="torchscript")
    assert r["max_abs_diff"] <= 1e-4
    save_pruned(model, tmp_path / "p.safetensors", ModelConfig(name=name, small_input=True), 4, SIZE)
    back = load_pruned(tmp_path / "p.safetensors")
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(back.eval()(x), model(x))


def test_class_aware_scores_depend_on_the_classes():
    torch.manual_seed(0)
    model = strip_gates(build_gated_model(ModelConfig(name="small_cnn"), GateConfig(), 4, 16)).eval()
    data = load_dataset(DataConfig(name="synthetic", num_classes=4, synthetic_train=64, synthetic_test=16,
                                   image_size=16))
    norm = lambda x: (x.float() / 255 - 0.5) / 0.25  # noqa: E731

    def scores(cls):
        keep = data.train_y == cls
        return class_aware_scores(model, "ocap", [(norm(data.train_x[keep]), data.train_y[keep])])

    a, b = scores(0), scores(1)
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_skip_first_keeps_the_first_conv_whole():
    torch.manual_seed(0)
    model = strip_gates(build_gated_model(ModelConfig(name="small_cnn"), GateConfig(), 4, SIZE)).eval()
    width = first_convs(model, 1)[0].out_channels
    calib = lambda: [(torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 4, (8,)))]  # noqa: E731
    m = copy.deepcopy(model)
    prune_step(m, torch.zeros(1, 3, SIZE, SIZE), "l1_structured", threshold=0.5, ratio=0.5, calibration=calib,
               skip_first=1)
    assert first_convs(m, 1)[0].out_channels == width
    prune_step(model, torch.zeros(1, 3, SIZE, SIZE), "l1_structured", threshold=0.5, ratio=0.5, calibration=calib)
    assert first_convs(model, 1)[0].out_channels < width


@pytest.mark.slow
def test_several_ratios_from_one_training_and_the_diagnostics(tmp_path):
    cfg = from_dict(SMOKE, {"prune.method": "ocap", "prune.target_sparsity": 0.5, "prune.ratios": [0.25, 0.75],
                            "prune.steps": 2, "data.classes": ["class_1", "class_2", "class_3"]})
    m = run_training(cfg, tmp_path, log=None)
    rows = sorted(m["ratio_curve"], key=lambda r: r["ratio"])
    assert [r["ratio"] for r in rows] == [0.25, 0.75]
    assert rows[0]["param_sparsity"] < m["param_sparsity"] < rows[1]["param_sparsity"]
    for r in (25, 75):
        d = tmp_path / "ratios" / f"r{r}"
        assert (d / "model.onnx").is_file() and (d / "pruned.safetensors").is_file()
        assert json.loads((d / "metrics.json").read_text())["prune_steps"][-1]["step"] == 2
    steps = m["prune_steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert steps[0]["param_sparsity"] == 0 and steps[2]["param_sparsity"] > steps[1]["param_sparsity"] > 0
    for name in ("ratio_curve.png", "prune_steps.png", "first_conv_filters.png",
                 "gate_histograms_over_training.png", "gate_histogram.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    hist = json.loads((tmp_path / "gate_history.json").read_text())
    assert len(hist["epochs"]) == 1 and all(sum(c) > 0 for c in hist["epochs"][0].values())


@pytest.mark.slow
def test_gate_iterative_run_writes_step_metrics_and_filter_grid(tmp_path):
    cfg = from_dict(SMOKE, {"prune.steps": 2, "gates.lr": 2.0, "gates.lam": 5.0, "train.epochs": 2})
    m = run_training(cfg, tmp_path, log=None)
    assert len(m["prune_steps"]) == 3 and (tmp_path / "prune_steps.png").is_file()
    assert (tmp_path / "first_conv_filters.png").stat().st_size > 5000


def test_report_names_the_removed_first_conv_filters():
    torch.manual_seed(0)
    model = strip_gates(build_gated_model(ModelConfig(name="small_cnn"), GateConfig(), 4, SIZE)).eval()
    conv = first_convs(model, 1)[0]
    w0 = conv.weight.detach().clone()
    rep = prune_step(model, torch.zeros(1, 3, SIZE, SIZE), "l1_structured", threshold=0.5, ratio=0.5, round_to=None)
    gone = sorted(rep.removed_idxs["features.0"])
    assert len(gone) == w0.shape[0] - conv.out_channels > 0
    kept = [i for i in range(w0.shape[0]) if i not in gone]
    torch.testing.assert_close(conv.weight.detach(), w0[kept])  # the survivors, in order


def write_gtsrb(root, classes=(0, 1, 2), per_class=5, sizes=((30, 34), (41, 37))):
    """torchvision's GTSRB layout: Training/<5-digit class>/*.ppm; Final_Test/Images/*.ppm + csv."""
    rng = np.random.default_rng(0)
    base = root / "gtsrb" / "GTSRB"
    rows = []
    for c in classes:
        d = base / "Training" / f"{c:05d}"
        d.mkdir(parents=True)
        for j in range(per_class):
            w, h = sizes[j % len(sizes)]
            img = np.full((h, w, 3), 40 * c, dtype=np.uint8) + rng.integers(0, 30, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{c:05d}_{j:05d}.ppm")
    test = base / "Final_Test" / "Images"
    test.mkdir(parents=True)
    for i in range(len(classes) * 2):
        c = classes[i % len(classes)]
        w, h = sizes[i % len(sizes)]
        Image.fromarray(np.full((h, w, 3), 40 * c, dtype=np.uint8)).save(test / f"{i:05d}.ppm")
        rows.append({"Filename": f"{i:05d}.ppm", "Width": w, "Height": h, "Roi.X1": 0, "Roi.Y1": 0, "Roi.X2": w,
                     "Roi.Y2": h, "ClassId": c})
    with open(root / "gtsrb" / "GT-final_test.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        wr.writeheader()
        wr.writerows(rows)
    return root


def test_gtsrb_through_torchvision_layout(tmp_path):
    root = write_gtsrb(tmp_path / "data")
    ds = load_dataset(DataConfig(name="gtsrb", root=str(root), download=False, image_size=24))
    # 15 training images: 2 held out as the validation split (data.val_split 0.1, rounded)
    assert ds.train_x.shape == (13, 3, 24, 24) and ds.val_x.shape == (2, 3, 24, 24)
    assert ds.test_x.shape == (6, 3, 24, 24)
    assert ds.num_classes == 43 and sorted(set(ds.train_y.tolist())) == [0, 1, 2]
    assert ds.test_y.tolist() == [0, 1, 2, 0, 1, 2]
    sub = load_dataset(DataConfig(name="gtsrb", root=str(root), download=False, classes=("2", "0")))
    assert sub.classes == ("2", "0") and sub.image_size == 32 and len(sub.train_y) + len(sub.val_y) == 10
    with pytest.raises(DatasetError, match="no GTSRB train split"):
        load_dataset(DataConfig(name="gtsrb", root=str(tmp_path / "nothing"), download=False))


@pytest.mark.slow
def test_large_imagefolder_images_stream_through_a_dataloader(tmp_path):
    from conftest import write_imagefolder

    from prunevision.data import DeviceLoader, FileLoader, ImageFiles

    root = write_imagefolder(tmp_path / "big", per_class=6, size=96)
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), workers=2, classes=("cat", "frog")))
    assert isinstance(ds.train_x, ImageFiles) and ds.image_size == 96 and ds.classes == ("cat", "frog")
    assert len(ds.train_x) == len(ds.train_y) == 11 and len(ds.val_x) == len(ds.val_y) == 1  # 12, 10 % held out
    loader = DeviceLoader(ds.train_x, ds.train_y, 5, ds.mean, ds.std, train=True, seed=1)
    assert isinstance(loader, FileLoader) and len(loader) == 2
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(5, 3, 96, 96)] * 2 and batches[0][0].dtype == torch.float32
    assert abs(float(torch.cat([x for x, _ in batches]).mean())) < 1.0  # normalised
    small = load_dataset(DataConfig(name="imagefolder", root=str(root), image_size=32))
    assert isinstance(small.train_x, torch.Tensor) and small.image_size == 32  # small: decoded in memory
    cfg = from_dict({**SMOKE, "data": {"name": "imagefolder", "root": str(root), "batch_size": 6, "workers": 1,
                                       "eval_batch_size": 6}}, {"measure.latency": False})
    m = run_training(cfg, tmp_path / "run", log=None)
    assert 0 <= m["accuracy"] <= 1 and m["dataset"]["image_size"] == 96
    assert (tmp_path / "run" / "model.onnx").is_file()

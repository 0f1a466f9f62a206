import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar_batches, write_imagefolder

from prunevision.config import ConfigError, DataConfig
from prunevision.data import (
    CIFAR10_CLASSES,
    DatasetError,
    DeviceLoader,
    ImageFiles,
    load_dataset,
    read_cifar_batch,
    val_split_indices,
)


def test_imagefolder_tree(tmp_path):
    root = write_imagefolder(tmp_path / "ds", per_class=5, size=16)
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), val_split=0))
    assert ds.classes == ("cat", "dog", "frog")
    assert ds.train_x.shape == (15, 3, 16, 16) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (15, 3, 16, 16)
    assert sorted(ds.train_y.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    # class i is coloured in channel i: labels and pixels agree
    for x, y in zip(ds.train_x, ds.train_y):
        assert int(x.float().mean(dim=(1, 2)).argmax()) == int(y)
    # per-dataset normalisation computed from the training images
    assert len(ds.mean) == 3 and all(0 < s for s in ds.std)


def test_imagefolder_val_split_resize_and_cache(tmp_path):
    root = write_imagefolder(tmp_path / "ds", per_class=3, size=20, splits=("train", "val"))
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=12)
    ds = load_dataset(cfg)
    assert ds.train_x.shape[-2:] == (12, 12) and len(ds.test_y) == 9
    cache = Path(os.environ["PRUNEVISION_CACHE"])
    assert len(list(cache.rglob("meta.json"))) == 1
    again = load_dataset(cfg)  # second time from the decoded cache
    assert torch.equal(again.train_x, ds.train_x)


def test_tar_gz_of_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class=2, size=8)
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="mydata")  # one folder level above train/ and test/
    ds = load_dataset(DataConfig(name="imagefolder", root=str(archive)))
    assert len(ds.train_y) + len(ds.val_y) == 6 and ds.classes == ("cat", "dog", "frog")


def test_tar_with_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"owned"
        info = tarfile.TarInfo("../../escape.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match="cannot extract"):
        load_dataset(DataConfig(name="imagefolder", root=str(archive)))
    assert not (tmp_path / "escape.txt").exists()


def test_torchvision_cifar_batches(tmp_path):
    write_cifar_batches(tmp_path, n_per_batch=20, n_test=30)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False, val_split=0))
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (30, 3, 32, 32)
    x, y = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert torch.equal(ds.train_x[:20], torch.from_numpy(x)) and ds.train_y[:20].tolist() == y.tolist()
    sub = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False, subset=0.5, test_subset=7))
    # the validation split (default 10 %) is carved out of the subset
    assert len(sub.train_y) == 45 and len(sub.val_y) == 5 and len(sub.test_y) == 7


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar_batch_that_runs_code_is_refused(tmp_path):
    d = write_cifar_batches(tmp_path)
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil()]}, f)
    with pytest.raises(DatasetError, match="refusing to load posix.system|refusing to load os.system|not a readable"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nothing"), download=False))
    msg = str(e.value)
    assert "no CIFAR-10 found" in msg and "DATA=<path>" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset(DataConfig(name="imagefolder"))


def test_imagefolder_that_is_not_cifar10(tmp_path):
    root = write_imagefolder(tmp_path / "ds", per_class=1, size=8)
    with pytest.raises(DatasetError, match="is not CIFAR-10"):
        load_dataset(DataConfig(name="cifar10", root=str(root)))


def test_corrupt_image_is_reported(tmp_path):
    root = write_imagefolder(tmp_path / "ds", per_class=1, size=8)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(DataConfig(name="imagefolder", root=str(root)))


def test_device_loader_batches_and_augmentation():
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8).remainder(256).to(torch.uint8)
    y = torch.arange(4)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ev = DeviceLoader(x, y, 3, mean, std, train=False)
    batches = list(ev)
    assert [len(b[1]) for b in batches] == [3, 1]  # evaluation keeps every image, in order
    assert torch.allclose(batches[0][0], (x[:3].float() / 255 - 0.5) / 0.25, atol=1e-5)
    tr = DeviceLoader(x, y, 2, mean, std, train=True, augment=True, seed=3)
    tr.set_epoch(0)
    a = [b[0] for b in tr]
    tr.set_epoch(0)
    b = [b[0] for b in tr]
    assert len(a) == 2 and a[0].shape == (2, 3, 8, 8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # seeded per epoch
    tr.set_epoch(1)
    c = [b[0] for b in tr]
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    # augmentation only moves and mirrors pixels: each image's value set is unchanged by a flip,
    # and crops come from the reflect-padded image
    plain = DeviceLoader(x, y, 4, mean, std, train=True, augment=False, seed=3)
    (xb, yb), = list(plain)
    assert torch.allclose(xb, (x[yb].float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_synthetic_is_learnable_and_seeded():
    a = load_dataset(DataConfig(name="synthetic", synthetic_train=40, synthetic_test=20, num_classes=4), seed=1)
    b = load_dataset(DataConfig(name="synthetic", synthetic_train=40, synthetic_test=20, num_classes=4), seed=1)
    assert torch.equal(a.train_x, b.train_x) and a.num_classes == 4
    # class means differ far more than within-class noise
    means = torch.stack([a.train_x[a.train_y == k].float().mean(0) for k in range(4)])
    assert (means[0] - means[1]).abs().mean() > 10


# --------------------------------------------------------------------------- validation split


def _synthetic(**kw):
    return DataConfig(name="synthetic", synthetic_train=200, synthetic_test=40, num_classes=4, **kw)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


def test_val_split_is_disjoint_sized_stratified_and_seeded():
    full = load_dataset(_synthetic(val_split=0), seed=3)
    ds = load_dataset(_synthetic(), seed=3)  # default 10 %
    assert len(ds.val_y) == 20 and len(ds.train_y) == 180 and ds.has_val
    # train and val partition the training images: nothing lost, nothing shared
    assert _rows(ds.train_x).isdisjoint(_rows(ds.val_x))
    assert _rows(ds.train_x) | _rows(ds.val_x) == _rows(full.train_x)
    assert torch.equal(ds.test_x, full.test_x)  # the test split is untouched
    # stratified: each of the 4 classes (50 images each) gives its share
    assert torch.bincount(ds.val_y, minlength=4).tolist() == [5, 5, 5, 5]
    again = load_dataset(_synthetic(), seed=3)
    assert torch.equal(again.val_x, ds.val_x) and torch.equal(again.train_x, ds.train_x)
    other = load_dataset(_synthetic(), seed=4)
    assert not torch.equal(val_split_indices(full.train_y, 0.1, 3)[1], val_split_indices(full.train_y, 0.1, 4)[1])
    assert len(other.val_y) == 20
    big = load_dataset(_synthetic(val_split=0.25), seed=3)
    assert len(big.val_y) == 50 and len(big.train_y) == 150


def test_val_split_indices_edge_cases():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    tr, va = val_split_indices(y, 0.3, seed=0)
    assert len(va) == round(0.3 * len(y)) and len(tr) + len(va) == len(y)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and set(tr.tolist()) | set(va.tolist()) == set(range(len(y)))
    assert torch.equal(va, val_split_indices(y, 0.3, seed=0)[1])
    assert len(val_split_indices(y, 0.01, seed=0)[1]) == 1  # a split asked for gets at least one image
    assert len(val_split_indices(y[:1], 0.5, seed=0)[1]) == 0  # and leaves at least one to train on
    tr, va = val_split_indices(y, 0.0, seed=0)
    assert len(va) == 0 and tr.tolist() == list(range(len(y)))


def test_val_split_zero_is_what_happened_before():
    ds = load_dataset(_synthetic(val_split=0), seed=1)
    assert not ds.has_val and len(ds.val_y) == 0 and ds.val_x.shape == (0, *ds.train_x.shape[1:])
    assert len(ds.train_y) == 200
    ds.to("cpu")  # moving an empty split is fine


def test_val_split_after_subset_and_classes():
    ds = load_dataset(_synthetic(subset=100, classes=("class_0", "class_2")), seed=0)
    assert len(ds.train_y) + len(ds.val_y) == 100 and len(ds.val_y) == 10
    assert set(ds.val_y.tolist()) == {0, 1}  # renumbered like the training labels


def test_imagefolder_has_a_val_split(tmp_path):
    root = write_imagefolder(tmp_path / "ds", per_class=10, size=16)
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), val_split=0.2))
    assert len(ds.val_y) == 6 and len(ds.train_y) == 24 and len(ds.test_y) == 30
    assert torch.bincount(ds.val_y, minlength=3).tolist() == [2, 2, 2]
    assert _rows(ds.train_x).isdisjoint(_rows(ds.val_x))
    # class i is coloured in channel i: validation images keep their labels
    for x, y in zip(ds.val_x, ds.val_y):
        assert int(x.float().mean(dim=(1, 2)).argmax()) == int(y)


def test_streamed_imagefolder_has_a_val_split(tmp_path):
    root = write_imagefolder(tmp_path / "big", per_class=5, size=72)
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), val_split=0.2, workers=0))
    assert isinstance(ds.train_x, ImageFiles) and isinstance(ds.val_x, ImageFiles)
    assert len(ds.val_x) == len(ds.val_y) == 3 and len(ds.train_x) == len(ds.train_y) == 12
    assert set(ds.train_x.paths).isdisjoint(ds.val_x.paths)
    assert all(f"/train/{ds.classes[int(y)]}/" in p for p, y in zip(ds.val_x.paths, ds.val_y))
    ds.to("cpu")
    assert isinstance(ds.val_x, ImageFiles) and ds.val_x.device == torch.device("cpu")
    xb, yb = next(iter(DeviceLoader(ds.val_x, ds.val_y, 8, ds.mean, ds.std, train=False)))
    assert xb.shape == (3, 3, 72, 72) and torch.equal(yb, ds.val_y)
    none = load_dataset(DataConfig(name="imagefolder", root=str(root), val_split=0, workers=0))
    assert len(none.val_x) == 0 and len(none.train_x) == 15


@pytest.mark.parametrize("value", [-0.1, 0.6, 1.0])
def test_bad_val_split_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"^data\.val_split: .* is out of range \[0\.0, 0\.5\]$"):
        DataConfig(val_split=value)


def test_a_missing_archive_path_is_not_a_download_target(tmp_path, monkeypatch):
    import prunevision.data as data_mod

    def no_download(root):
        raise AssertionError(f"tried to download CIFAR-10 into {root}")

    monkeypatch.setattr(data_mod, "_download_cifar10", no_download)
    for name in ("cifar10-jpeg.tar.gz", "data.tgz", "x.zip"):
        with pytest.raises(DatasetError, match=r"^data.root: .* does not exist$"):
            load_dataset(DataConfig(name="cifar10", root=str(tmp_path / name)))
        assert not (tmp_path / name).exists()

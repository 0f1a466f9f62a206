"""Hostile inputs and failing outputs: each ends in one line and exit 2 (never a traceback, a hang,
or a lost or overwritten record). Tiny synthetic files only; the one training run is smoke-sized."""

import errno
import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar_batches, write_imagefolder
from safetensors.torch import save

from prunevision import fsutil
from prunevision.checkpoint import PrunedCheckpointError, _digest, load_pruned, read_pruned, save_pruned
from prunevision.config import ConfigError, DataConfig, ModelConfig, load_config
from prunevision.data import MAX_IMAGE_PIXELS, DatasetError, load_dataset
from prunevision.fsutil import OutputError, atomic_write, locked_folder, write_json
from prunevision_cli.main import main

QUICK = ["--smoke-test", "--set", "measure.enabled=false"]


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def finished_run(d: Path) -> dict[str, bytes]:
    """A folder holding a finished run's record (as `prunevision train` leaves it)."""
    d.mkdir(parents=True, exist_ok=True)
    files = {"metrics.json": b'{"accuracy": 0.9}', "config.yaml": b"seed: 7\n", "checkpoint.pt": b"weights"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def unchanged(d: Path, files: dict[str, bytes]) -> bool:
    return all((d / n).read_bytes() == data for n, data in files.items())


# --------------------------------------------------------------------------- 1. the output folder


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    files = finished_run(out)
    one_line_error(capsys, main(["train", *QUICK, "--out", str(out)]), "already holds a finished run", "--overwrite")
    assert unchanged(out, files)
    one_line_error(capsys, main(["prune", str(out), "--out", str(out)]))  # not a checkpoint: refused first
    assert unchanged(out, files)


def test_a_run_refused_after_the_checks_leaves_the_finished_run(tmp_path, capsys):
    # --overwrite, but the run fails before it is valid (its model cannot be built): nothing replaced
    out = tmp_path / "run"
    files = finished_run(out)
    rc = main(["train", *QUICK, "--out", str(out), "--overwrite", "--set", "model.name=resnet18",
               "--set", "model.pretrained=true", "--set", f"model.weights={tmp_path / 'missing.pth'}"])
    one_line_error(capsys, rc, "missing.pth")
    assert unchanged(out, files)
    rc = main(["train", *QUICK, "--out", str(out), "--overwrite", "--set", "data.name=cifar10",
               "--set", f"data.root={tmp_path / 'none'}", "--set", "data.download=false"])
    one_line_error(capsys, rc, "no CIFAR-10 found")
    assert unchanged(out, files)


def test_config_yaml_is_written_only_once_the_run_is_valid(tmp_path):
    from prunevision.models import PretrainedWeightsError
    from prunevision.pipeline import run_training

    cfg = load_config(None, {"data.name": "synthetic", "data.synthetic_train": 16, "data.synthetic_test": 8,
                             "model.name": "resnet18", "model.pretrained": True,
                             "model.weights": str(tmp_path / "missing.pth")})
    calls = []
    with pytest.raises(PretrainedWeightsError):
        run_training(cfg, tmp_path / "out", log=None, before_write=lambda: calls.append(1))
    assert not (tmp_path / "out").exists() and calls == []


@pytest.mark.slow
def test_two_runs_into_one_folder(tmp_path, capsys):
    out = tmp_path / "run"
    with locked_folder(out):  # another run holds the folder
        rc = main(["train", *QUICK, "--out", str(out)])
        one_line_error(capsys, rc, f"{out} is being written by another run (pid {os.getpid()})")
    assert sorted(p.name for p in out.iterdir()) == [fsutil.LOCK_FILE]
    # released: a run goes through; a second one into the finished folder is refused, --overwrite
    # replaces it and leaves none of the old run's outputs
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "ratio_curve.png").write_bytes(b"from the old run")
    (out / "notes.txt").write_text("mine")
    one_line_error(capsys, main(["train", *QUICK, "--out", str(out)]), "already holds a finished run")
    assert main(["train", *QUICK, "--out", str(out), "--overwrite", "--set", "seed=3"]) == 0
    assert not (out / "ratio_curve.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 3
    # an unfinished run (no metrics.json) is refused too, unless continued in place with --resume
    (out / "metrics.json").unlink()
    capsys.readouterr()
    one_line_error(capsys, main(["train", *QUICK, "--out", str(out)]), "unfinished run", "--resume")
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--set", "train.epochs=2", "--set",
                 "measure.enabled=false", "--out", str(out)]) == 0
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]
    # pruning again into the training folder replaces its results, never the checkpoint it reads
    ckpt = (out / "checkpoint.pt").read_bytes()
    assert main(["prune", str(out / "checkpoint.pt"), "--out", str(out), "--overwrite", "--set",
                 "measure.export=false", "--set", "measure.latency=false"]) == 0
    assert (out / "checkpoint.pt").read_bytes() == ckpt and (out / "pruned.safetensors").is_file()


def _refuse_writes_in(monkeypatch, folder: Path) -> None:
    """As root, chmod does not stop writes: refuse them the way a read-only folder would."""
    real = fsutil.tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(fsutil.tempfile, "mkstemp", mkstemp)


def test_outputs_that_cannot_be_written_stop_before_any_work(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    missing_data = ["--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'none'}",
                    "--set", "data.download=false"]  # the data would fail next: the output is checked first
    one_line_error(capsys, main(["train", *QUICK, *missing_data, "--out", str(afile / "run")]),
                   "is under", "which is a file")
    one_line_error(capsys, main(["train", *QUICK, *missing_data, "--out", str(afile)]), "a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        _refuse_writes_in(monkeypatch, ro)
    try:
        one_line_error(capsys, main(["train", *QUICK, *missing_data, "--out", str(ro / "run")]), "not writable")
        assert not (ro / "run").exists()
        one_line_error(capsys, main(["sweep", "run", "sweeps/configs/quickstart.yaml", "--storage", str(ro)]),
                       "--storage", "not writable")
        one_line_error(capsys, main(["export", str(tmp_path / "none.safetensors"), "--out", str(ro / "m.onnx")]),
                       "not writable")
    finally:
        ro.chmod(0o755)
    one_line_error(capsys, main(["sweep", "run", "sweeps/configs/quickstart.yaml", "--storage", str(afile)]),
                   "--storage", "a file, not a folder")
    one_line_error(capsys, main(["export", str(tmp_path / "none.safetensors"), "--out", str(afile / "m.onnx")]),
                   "the folder of --out", "is a file")


# --------------------------------------------------------------------------- 5. a full disk


def _disk_full(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil.os, "fsync", fsync)


def test_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.5})
    before = path.read_bytes()
    _disk_full(monkeypatch)
    with pytest.raises(OutputError, match="No space left on device"):
        write_json(path, {"accuracy": 0.9})
    with pytest.raises(OutputError, match="No space left"):
        atomic_write(tmp_path / "new.bin", b"x" * 1000)
    assert path.read_bytes() == before and not (tmp_path / "new.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left
    # a run on a full disk: one line, its folder holds nothing half-written
    out = tmp_path / "run"
    one_line_error(capsys, main(["train", *QUICK, "--out", str(out)]), "config.yaml", "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == [fsutil.LOCK_FILE]


# --------------------------------------------------------------------------- 2. archives


def _tar_bytes(root: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        tf.add(root, arcname="mydata")
    return raw.getvalue()


def _member_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.offset for m in tf]


def _extracted(cache: Path) -> list[str]:
    d = cache / "extracted"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.parametrize("damage", ["bad header", "zeroed header"])
def test_tar_with_a_damaged_member_header_is_refused_and_not_cached(tmp_path, damage):
    root = write_imagefolder(tmp_path / "src", per_class=3, size=8)
    data = bytearray(_tar_bytes(root))
    at = _member_offsets(bytes(data))[-4]  # a member near the end: the ones before it extract fine
    data[at:at + 512] = b"X" * 20 + bytes(data[at + 20:at + 512]) if damage == "bad header" else bytes(512)
    archive = tmp_path / "ds.tar.gz"
    archive.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DatasetError, match="cannot extract") as e:
        load_dataset(DataConfig(name="imagefolder", root=str(archive)))
    assert "\n" not in str(e.value)
    assert _extracted(Path(os.environ["PRUNEVISION_CACHE"])) == []  # no partial tree, complete or not


def test_truncated_and_empty_archives(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "src", per_class=3, size=8)
    whole = gzip.compress(_tar_bytes(root))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DatasetError, match="cannot extract"):
        load_dataset(DataConfig(name="imagefolder", root=str(cut)))
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF  # damaged compressed data
    bad = tmp_path / "flipped.tar.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DatasetError, match="cannot extract"):
        load_dataset(DataConfig(name="imagefolder", root=str(bad)))
    assert _extracted(Path(os.environ["PRUNEVISION_CACHE"])) == []
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    rc = main(["train", *QUICK, "--set", "data.name=imagefolder", "--set", f"data.root={empty}",
               "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "neither a folder nor a .tar")
    # a whole archive still extracts, once
    good = tmp_path / "good.tar.gz"
    good.write_bytes(whole)
    ds = load_dataset(DataConfig(name="imagefolder", root=str(good), val_split=0))
    assert len(ds.train_y) == 9


def test_archive_member_declaring_a_huge_size(tmp_path, monkeypatch):
    from prunevision import data

    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 1000)  # a 1 GiB member in a test would be slow to write
    root = write_imagefolder(tmp_path / "src", per_class=2, size=8)
    (root / "train" / "cat" / "big.png").write_bytes(bytes(5000))
    archive = tmp_path / "ds.tar.gz"
    archive.write_bytes(gzip.compress(_tar_bytes(root)))
    with pytest.raises(DatasetError, match="big.png.*declares 5,000 bytes"):
        load_dataset(DataConfig(name="imagefolder", root=str(archive)))
    assert _extracted(Path(os.environ["PRUNEVISION_CACHE"])) == []


# --------------------------------------------------------------------------- 3. images and CIFAR batches


def png_declaring(path: Path, w: int, h: int) -> Path:
    """A tiny PNG file whose header declares w×h pixels (what a decompression bomb looks like
    until it is decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20000, 9000, 8500])  # PIL's error, PIL's warning, only our limit
def test_decompression_bomb_is_refused(tmp_path, capsys, side):
    assert side * side > MAX_IMAGE_PIXELS
    root = write_imagefolder(tmp_path / "ds", per_class=2, size=8)
    png_declaring(root / "train" / "cat" / "bomb.png", side, side)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(
            DatasetError, match=r"bomb.png \(.*pixels\) is over the limit of 64 megapixels"):
        warnings.simplefilter("always")
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    assert not seen  # PIL's own warning (two more lines on stderr) is not shown either
    rc = main(["train", *QUICK, "--set", "data.name=imagefolder", "--set", f"data.root={root}",
               "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "bomb.png", "megapixels")


def test_bomb_in_a_streamed_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "big", per_class=2, size=72)  # streamed from disk
    png_declaring(root / "train" / "dog" / "0000.png", 20000, 20000)
    with pytest.raises(DatasetError, match="0000.png.*megapixels"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), workers=0))


def test_corrupt_image_files_are_named(tmp_path):
    root = write_imagefolder(tmp_path / "ds", per_class=2, size=16)
    png = root / "train" / "dog" / "0001.png"
    png.write_bytes(png.read_bytes()[:60])  # a valid header, then nothing
    with pytest.raises(DatasetError, match="0001.png") as e:
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    assert "\n" not in str(e.value)
    big = write_imagefolder(tmp_path / "big", per_class=2, size=72)
    bad = big / "test" / "frog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    ds = load_dataset(DataConfig(name="imagefolder", root=str(big), workers=0, val_split=0))
    from prunevision.data import DeviceLoader

    with pytest.raises(DatasetError, match="0001.png"):
        list(DeviceLoader(ds.test_x, ds.test_y, 8, ds.mean, ds.std, train=False))


def test_corrupt_image_read_by_a_loader_worker_is_one_line(tmp_path):
    big = write_imagefolder(tmp_path / "big", per_class=2, size=72)
    bad = big / "test" / "frog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    ds = load_dataset(DataConfig(name="imagefolder", root=str(big), workers=1, val_split=0))
    from prunevision.data import DeviceLoader

    with pytest.raises(DatasetError, match="0001.png") as e:
        list(DeviceLoader(ds.test_x, ds.test_y, 8, ds.mean, ds.std, train=False))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def _rewrite_batch(d: Path, name: str, change: dict):
    with open(d / name, "rb") as f:
        batch = pickle.load(f)
    batch.update(change)
    with open(d / name, "wb") as f:
        pickle.dump(batch, f)


@pytest.mark.slow
@pytest.mark.parametrize("labels", [[10], [-1], [3, 250]])
def test_cifar_batch_with_a_label_out_of_range(tmp_path, capsys, labels):
    d = write_cifar_batches(tmp_path / "cifar", n_per_batch=4, n_test=4)
    _rewrite_batch(d, "data_batch_2", {b"labels": [0, 1, 2, 3][: 4 - len(labels)] + labels})
    with pytest.raises(DatasetError, match="data_batch_2.*out of range"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "cifar"), download=False))
    rc = main(["train", *QUICK, "--set", f"data.root={tmp_path / 'cifar'}", "--set", "data.download=false",
               "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "out of range")


@pytest.mark.parametrize("change", [
    {b"data": np.full((4, 3072), 300, np.int64)},  # not bytes
    {b"labels": [0.5, 1.0, 2.0, 3.0]},  # not whole numbers
    {b"data": "pixels"},
])
def test_cifar_batch_with_wrong_types(tmp_path, change):
    d = write_cifar_batches(tmp_path / "cifar", n_per_batch=4, n_test=4)
    _rewrite_batch(d, "test_batch", change)
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "cifar"), download=False))


def test_a_decoded_cache_with_labels_out_of_range_is_decoded_again(tmp_path):
    d = write_cifar_batches(tmp_path / "cifar", n_per_batch=4, n_test=4)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "cifar"), download=False, val_split=0)
    first = load_dataset(cfg)
    cache = next(Path(os.environ["PRUNEVISION_CACHE"]).rglob("train_y.npy"))
    np.save(cache, np.full(20, 99, np.int64))  # an old or edited cache entry
    (cache.parent / "meta.json").write_text(json.dumps({"classes": 5, "mean": [0], "std": None}))
    again = load_dataset(cfg)
    assert torch.equal(again.train_y, first.train_y) and d.is_dir()


# --------------------------------------------------------------------------- more hostile ImageFolders


def test_links_and_special_files_in_an_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "ds", per_class=2, size=8)
    cat = root / "train" / "cat"
    (cat / "loop.png").symlink_to(cat / "loop.png")  # a link to itself
    with pytest.raises(DatasetError, match="loop.png.*not a regular file"):
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    (cat / "loop.png").unlink()
    (cat / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DatasetError, match="gone.png"):
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    (cat / "gone.png").unlink()
    os.mkfifo(cat / "pipe.png")  # opening it to decode would wait forever
    with pytest.raises(DatasetError, match="pipe.png"):
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    (cat / "pipe.png").unlink()
    (root / "train" / "dog" / "sub").mkdir()
    (root / "train" / "dog" / "sub" / "up").symlink_to(root / "train")  # a folder loop: not followed
    assert len(load_dataset(DataConfig(name="imagefolder", root=str(root), val_split=0)).train_y) == 6


def test_an_empty_class_folder_is_named(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "ds", per_class=2, size=8)
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "readme.txt").write_text("no pictures")
    with pytest.raises(DatasetError, match="zebra holds no images"):
        load_dataset(DataConfig(name="imagefolder", root=str(root)))
    rc = main(["train", *QUICK, "--set", "data.name=imagefolder", "--set", f"data.root={root}",
               "--out", str(tmp_path / "r")])
    one_line_error(capsys, rc, "zebra")


@pytest.mark.slow
def test_unreadable_configs(tmp_path, capsys):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("train:\n  epochs: 2 # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)
    one_line_error(capsys, main(["train", str(latin), "--out", str(tmp_path / "r")]), "not UTF-8")
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50000)
    one_line_error(capsys, main(["train", str(deep), "--out", str(tmp_path / "r")]), "nested too deeply")
    one_line_error(capsys, main(["train", str(tmp_path), "--out", str(tmp_path / "r")]), "is a folder, not a YAML file")


def test_checkpoints_that_are_folders(tmp_path, capsys):
    d = tmp_path / "ckpt.safetensors"
    d.mkdir()
    with pytest.raises(PrunedCheckpointError, match="is a folder"):
        read_pruned(d)
    one_line_error(capsys, main(["export", str(d), "--out", str(tmp_path / "m.onnx")]), "is a folder")
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    one_line_error(capsys, main(["train", "--resume", str(tmp_path / "run"), "--out", str(tmp_path / "r")]),
                   "checkpoint")


# --------------------------------------------------------------------------- 4. edited checkpoint metadata


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    from prunevision.models import create_model

    model = create_model(ModelConfig(name="small_cnn"), 10, 16, pretrained=False)
    from prunevision.prune import strip_gates

    return save_pruned(strip_gates(model), tmp_path_factory.mktemp("ck") / "p.safetensors",
                       ModelConfig(name="small_cnn"), 10, 16, extra={"mean": [0.5] * 3, "std": [0.25] * 3})


def resign(src: Path, dst: Path, edit) -> Path:
    """The checkpoint with its metadata edited and the checksum recomputed (anyone can do this)."""
    meta, tensors = read_pruned(src)
    meta = edit(json.loads(json.dumps(meta)))
    meta_json = json.dumps(meta)
    dst.write_bytes(save(tensors, metadata={"prunevision": meta_json, "sha256": _digest(meta_json, tensors)}))
    return dst


def _set(path: str | tuple[str, ...], value):
    def edit(meta):
        node = meta
        *parents, last = path.split(".") if isinstance(path, str) else path
        for p in parents:
            node = node[p]
        node[last] = value
        return meta
    return edit


EDITS = {
    "num_classes 14.7 T": _set("num_classes", 14_700_000_000_000),
    "num_classes huge": _set("num_classes", 10**9),
    "num_classes a string": _set("num_classes", "10"),
    "num_classes not a layer width": _set("num_classes", 12),
    "image_size huge": _set("image_size", 10**6),
    "image_size a float": _set("image_size", 16.5),
    "image_size in range, wrong for small_cnn": _set("image_size", 1024),
    "model name": _set("model.name", "os.system"),
    "model section a list": _set("model", ["small_cnn"]),
    "fusion channels": _set("model.fusion_channels", 10**9),
    "layer width against its tensor": _set(("layers", "features.0", "out"), 31),
    "layer width negative": _set(("layers", "features.0", "out"), -1),
    "layer width a bool": _set(("layers", "features.1", "out"), True),
    "layer widths wrong kind": _set(("layers", "features.1"), {"in": 3, "out": 32}),
    "layers a list": _set("layers", []),
    "hybrid_active on small_cnn": _set("hybrid_active", [0]),
    "extra a string": _set("extra", "x"),
    "extra.mean NaN": _set("extra.mean", [float("nan")] * 3),
    "unknown layer": lambda m: {**m, "layers": {**m["layers"], "nope": {"out": 3}}},
}


@pytest.mark.parametrize("what", list(EDITS))
def test_edited_metadata_with_a_recomputed_checksum_is_refused(pruned_file, tmp_path, capsys, what):
    bad = resign(pruned_file, tmp_path / "edited.safetensors", EDITS[what])
    with pytest.raises(PrunedCheckpointError) as e:
        load_pruned(bad)
    assert "\n" not in str(e.value) and len(str(e.value)) < 500
    one_line_error(capsys, main(["export", str(bad), "--out", str(tmp_path / "m.onnx")]), str(bad))
    assert not (tmp_path / "m.onnx").exists()


def test_the_unedited_checkpoint_still_loads(pruned_file):
    model = load_pruned(pruned_file)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_metadata_that_is_not_an_object(pruned_file, tmp_path):
    _, tensors = read_pruned(pruned_file)
    for meta_json in ("[1, 2]", "null", "[" * 100000 + "]" * 100000):
        p = tmp_path / "m.safetensors"
        p.write_bytes(save(tensors, metadata={"prunevision": meta_json, "sha256": _digest(meta_json, tensors)}))
        with pytest.raises(PrunedCheckpointError, match="damaged metadata"):
            read_pruned(p)


@pytest.fixture(scope="module")
def train_checkpoint(tmp_path_factory):
    from prunevision.config import from_dict
    from prunevision.models import build_gated_model
    from prunevision.train import TrainState, make_optimizers

    cfg = from_dict({"model": {"name": "small_cnn", "num_classes": 10, "small_input": True}})  # resolved
    model = build_gated_model(cfg.model, cfg.gates, 10, 16)
    opt, gopt = make_optimizers(model, cfg)
    return TrainState(model, opt, gopt, cfg, epoch=1, image_size=16).save(
        tmp_path_factory.mktemp("tc") / "checkpoint.pt")


def _num_classes(ckpt: dict) -> None:
    cfg = json.loads(ckpt["config"])  # the config is a JSON string inside the checkpoint
    cfg["model"]["num_classes"] = 14_700_000_000_000
    ckpt["config"] = json.dumps(cfg)


TRAIN_EDITS = {
    "num_classes 14.7 T": _num_classes,
    "image_size huge": lambda c: c.update(image_size=10**6),
    "epoch a string": lambda c: c.update(epoch="1"),
    "model not tensors": lambda c: c.update(model={"w": "x"}),
    "history not a list": lambda c: c.update(history=json.dumps({"a": 1})),
    "optimizer of another model": lambda c: c["optimizer"]["param_groups"][0].update(params=[0]),
    "tensor of another shape": lambda c: c["model"].update({k: torch.zeros(3) for k in list(c["model"])[:1]}),
}


@pytest.mark.parametrize("what", list(TRAIN_EDITS))
def test_edited_training_checkpoints_are_one_line(train_checkpoint, tmp_path, capsys, what):
    ckpt = torch.load(train_checkpoint, weights_only=True)
    TRAIN_EDITS[what](ckpt)
    bad = tmp_path / "checkpoint.pt"
    torch.save(ckpt, bad)
    if what != "optimizer of another model":  # export reads no optimiser state
        one_line_error(capsys, main(["export", str(bad), "--out", str(tmp_path / "m.onnx")]))
    rc = main(["train", "--resume", str(bad), "--out", str(tmp_path / "r"), "--set", "data.name=synthetic",
               "--set", "data.synthetic_train=16", "--set", "data.synthetic_test=8", "--set", "data.image_size=16",
               "--set", "measure.enabled=false", "--set", "train.epochs=2"])
    one_line_error(capsys, rc, *(["does not fit"] if what in ("optimizer of another model",
                                                              "tensor of another shape") else []))


# --------------------------------------------------------------------------- 6. sweep records


def _sweep(d: Path, state_text: str | bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "prunevision_sweep.json"
    p.write_bytes(state_text if isinstance(state_text, bytes) else state_text.encode())
    return d


GOOD_STATE = {"name": "s1", "storage": "x", "sweep_dir": "x", "source": {}, "base": {},
              "settings": {"tracking_uri": "sqlite:///x.db", "experiment_id": "1", "parent_run_id": "p"},
              "run": {"objectives": {"val_accuracy": "max", "param_sparsity": "max"}, "num_samples": 2}}


def _without(path: str):
    state = json.loads(json.dumps(GOOD_STATE))
    *parents, last = path.split(".")
    node = state
    for p in parents:
        node = node[p]
    del node[last]
    return json.dumps(state)


DAMAGED = {
    "not JSON": '{"name": "s1", ',
    "not UTF-8": b"\xff\xfe{}",
    "a list": "[1, 2]",
    "no run": _without("run"),
    "no objectives": _without("run.objectives"),
    "no tracking uri": _without("settings.tracking_uri"),
    "settings a string": json.dumps({**GOOD_STATE, "settings": "sqlite:///x.db"}),
    "objectives a list": json.dumps({**GOOD_STATE, "run": {**GOOD_STATE["run"], "objectives": ["a"]}}),
    "objective mode": json.dumps({**GOOD_STATE, "run": {**GOOD_STATE["run"], "objectives": {"a": "up"}}}),
    "name a number": json.dumps({**GOOD_STATE, "name": 3}),
    "num_samples a string": json.dumps({**GOOD_STATE, "run": {**GOOD_STATE["run"], "num_samples": "2"}}),
}


@pytest.mark.parametrize("what", list(DAMAGED))
def test_a_damaged_sweep_record_is_one_line(tmp_path, capsys, what):
    from analysis.results import SweepDataError, read_state

    d = _sweep(tmp_path / "sweep", DAMAGED[what])
    with pytest.raises(SweepDataError, match="prunevision_sweep.json"):
        read_state(d)
    one_line_error(capsys, main(["sweep", "status", str(d)]), "prunevision_sweep.json")
    one_line_error(capsys, main(["analyze", str(d), "--no-mlflow"]), "prunevision_sweep.json")
    one_line_error(capsys, main(["export", str(d), "--out", str(tmp_path / "m.onnx"), "--no-register"]),
                   "prunevision_sweep.json")


def test_export_of_a_sweep_whose_trials_all_errored(tmp_path, capsys):
    d = _sweep(tmp_path / "sweep", json.dumps(GOOD_STATE))
    for i in range(2):
        t = d / f"trial_{i}"
        t.mkdir()
        (t / "params.json").write_text(json.dumps({"gates.lam": 0.5}))
        (t / "result.json").write_text(json.dumps({"trial_id": f"t{i}", "epoch": 1, "val_accuracy": 0.1}) + "\n")
    rows = [[json.dumps({"trial_id": f"t{i}", "status": "ERROR", "relative_logdir": f"trial_{i}"}),
             json.dumps({"num_failures": 1})] for i in range(2)]
    (d / "experiment_state-2026-01-01.json").write_text(json.dumps({"trial_data": rows}))
    one_line_error(capsys, main(["export", str(d), "--out", str(tmp_path / "m.onnx"), "--no-register"]),
                   "no complete trial", "2 error")
    one_line_error(capsys, main(["analyze", str(d), "--no-mlflow"]), "no complete trial")
    assert not (tmp_path / "m.onnx").exists()
    # `sweep status` says they errored (it used to call every unfinished trial "stopped")
    main(["sweep", "status", str(d)])
    out = capsys.readouterr().out
    assert "t0: error at epoch 1" in out and "t1: error at epoch 1" in out and "stopped" not in out


@pytest.mark.parametrize("reader", ["training checkpoint", "pruned checkpoint", "model weights"])
def test_a_file_argument_that_is_a_fifo_or_a_folder_is_one_line_and_never_opened(tmp_path, reader):
    from prunevision.checkpoint import PrunedCheckpointError, read_pruned
    from prunevision.models import PretrainedWeightsError, _load_weights_file
    from prunevision.train import CheckpointError, load_checkpoint

    read, error = {"training checkpoint": (load_checkpoint, CheckpointError),
                   "pruned checkpoint": (read_pruned, PrunedCheckpointError),
                   "model weights": (lambda p: _load_weights_file(Path(p)), PretrainedWeightsError)}[reader]
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: it must not be opened
    with pytest.raises(error, match="is not a regular file") as e:
        read(fifo)
    assert "\n" not in str(e.value)
    with pytest.raises(error, match="not found"):
        read(tmp_path / "missing.pt")
    if reader != "training checkpoint":  # (a training checkpoint's folder means its checkpoint.pt)
        with pytest.raises(error, match="is a folder, not a file"):
            read(tmp_path)

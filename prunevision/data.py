"""Datasets as uint8 tensors on the training device, augmented there in whole batches.

Small images (CIFAR-10 and other ImageFolder trees of small pictures) are decoded once into a
cache of plain ``.npy`` arrays, loaded onto the training device, and augmented batch-wise
(reflect pad-and-crop, horizontal flip) with tensor ops: no per-sample Python transform in the
hot loop, so the loader is never what a trial waits on.

Sources: ``torchvision.datasets.CIFAR10`` (downloaded for real users), a torchvision CIFAR-10
folder, any ImageFolder tree (``train/`` and ``test/`` or ``val/``), a .tar.gz of either, and a
synthetic dataset for tests. CIFAR-10's python batches are pickles: they are read with an
unpickler that can build nothing but numpy arrays, lists and dicts.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prunevision.config import DataConfig

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


class DatasetError(RuntimeError):
    """A dataset could not be found, downloaded or read. The message says how to provide one."""


@dataclass
class Dataset:
    """Decoded images (uint8, N×3×H×W) and labels, with the normalisation to apply.

    ``val_x``/``val_y``: the validation split, held out of the training images by
    :func:`load_dataset` (``data.val_split``); empty (same layout as ``train_x``, no images) when
    there is none, in which case :attr:`has_val` is false and callers use the test split in its place.
    """

    name: str
    classes: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    selected: tuple[str, ...] | None = None  # data.classes: the classes trained and evaluated on
    val_x: Any = None  # a tensor (or ImageFiles) like train_x; None: empty
    val_y: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.val_x is None or self.val_y is None:
            self.val_x, self.val_y = self.train_x[:0], self.train_y[:0]

    @property
    def has_val(self) -> bool:
        return len(self.val_y) > 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def per_class(self, values: list[float]) -> dict[str, float]:
        """Per-class figures by class name; with data.classes and a full head, the selected ones only."""
        pc = dict(zip(self.classes, values))
        return {c: pc[c] for c in self.selected} if self.selected else pc

    def to(self, device: torch.device | str) -> Dataset:
        for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            setattr(self, k, getattr(self, k).to(device, non_blocking=True))
        return self


def default_cache_dir(cfg: DataConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("PRUNEVISION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prunevision"
    )
    return Path(base)


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load (decoding once, then from cache) and subset the dataset the config names, then hold
    ``data.val_split`` of the remaining training images out as the validation split (seeded,
    stratified per class; none when it is 0)."""
    if cfg.name == "synthetic":
        ds = synthetic_dataset(cfg.num_classes, cfg.synthetic_train, cfg.synthetic_test,
                               cfg.image_size or 32, seed=seed)
    elif cfg.name == "gtsrb":
        ds = _load_gtsrb(cfg)
    else:
        ds = _load_real(cfg)
    if cfg.classes:
        ds = select_classes(ds, cfg.classes, renumber=cfg.class_head == "subset")
    g = torch.Generator().manual_seed(seed)
    ds.train_x, ds.train_y = _subset(ds.train_x, ds.train_y, cfg.subset, g)
    ds.test_x, ds.test_y = _subset(ds.test_x, ds.test_y, cfg.test_subset, g)
    train_idx, val_idx = val_split_indices(ds.train_y, cfg.val_split, seed)
    if len(val_idx):
        ds.val_x, ds.val_y = ds.train_x[val_idx], ds.train_y[val_idx]
        ds.train_x, ds.train_y = ds.train_x[train_idx], ds.train_y[train_idx]
    else:
        ds.val_x, ds.val_y = ds.train_x[:0], ds.train_y[:0]
    return ds


def val_split_indices(y: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into ``y`` (each sorted): ``round(fraction · n)`` images held out for
    validation (at least 1 and at most n − 1 when ``fraction`` > 0), stratified per class (each
    class gives its share, ±1 image). Depends on the labels and ``seed`` only: the same seed gives
    the same split. ``fraction`` 0: no validation images."""
    y = y.cpu().long()
    n = len(y)
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = 0
    if k == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    g = torch.Generator().manual_seed(_VAL_SEED + seed)
    perm = torch.randperm(n, generator=g)
    yp = y[perm]
    counts = torch.bincount(yp)
    # each image's rank among its class (in the shuffled order), spread over [0, 1) per class with
    # a random offset per class: taking the k lowest takes every class's share
    order = torch.sort(yp, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = (torch.arange(n) - starts[yp[order]]).double()
    offset = torch.rand(len(counts), generator=g, dtype=torch.float64)
    key = (rank + offset[yp]) / counts[yp].double()
    chosen = torch.sort(key, stable=True).indices[:k]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[perm[chosen]] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


_VAL_SEED = 20_011  # the validation split's generator: apart from the one that draws data.subset


def resolve_classes(available: tuple[str, ...], wanted: tuple[str, ...]) -> list[int]:
    """Indices of the wanted classes: by name, else by index into the dataset's class list."""
    import difflib

    out = []
    for w in wanted:
        if w in available:
            out.append(available.index(w))
        elif w.isdigit() and int(w) < len(available):
            out.append(int(w))
        else:
            near = difflib.get_close_matches(w, available, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise DatasetError(f"data.classes: the dataset has no class {w!r}{hint}; it has "
                               f"{', '.join(available[:12])}{', ...' if len(available) > 12 else ''}")
    if len(set(out)) != len(out):
        raise DatasetError("data.classes: the same class is named twice (by name and by index)")
    return out


def select_classes(ds: Dataset, wanted: tuple[str, ...], renumber: bool = True) -> Dataset:
    """Keep only the images of the wanted classes. ``renumber``: labels become 0..k-1 in the order
    given and ``classes`` lists just those (the model gets a k-way head); otherwise labels and the
    class list stay as they are. ``selected`` names the classes kept either way."""
    idx = resolve_classes(ds.classes, wanted)
    lut = torch.full((len(ds.classes),), -1, dtype=torch.long)
    lut[torch.tensor(idx)] = torch.arange(len(idx))
    for split in ("train", "val", "test"):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        if split == "val" and len(y) == 0:
            continue
        keep = lut[y.cpu()] >= 0
        if not keep.any():
            raise DatasetError(f"data.classes: no {split} image belongs to {', '.join(wanted)}")
        x, y = x[keep.to(x.device)], y[keep.to(y.device)]
        setattr(ds, f"{split}_x", x)
        setattr(ds, f"{split}_y", lut.to(y.device)[y] if renumber else y)
    names = tuple(ds.classes[i] for i in idx)
    ds.selected = names
    if renumber:
        ds.classes = names
    return ds


def _subset(x: torch.Tensor, y: torch.Tensor, amount: float | None, g: torch.Generator):
    if amount is None or amount == 1:
        return x, y
    n = len(y)
    k = int(round(n * amount)) if amount < 1 else min(int(amount), n)
    idx = torch.randperm(n, generator=g)[: max(k, 1)].sort().values
    return x[idx], y[idx]


# --------------------------------------------------------------------------- synthetic


def synthetic_dataset(num_classes: int, n_train: int, n_test: int, size: int = 32, seed: int = 0) -> Dataset:
    """Learnable generated images: each class is a smooth random pattern plus noise.

    For tests and ``--smoke-test`` only; never used in place of a missing real dataset.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    protos = torch.rand(num_classes, 3, 4, 4, generator=g)
    protos = F.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = protos[y] + 0.25 * torch.randn(n, 3, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    trx, tr_y = make(n_train)
    tex, te_y = make(n_test)
    mean, std = _channel_stats(trx)
    classes = tuple(f"class_{i}" for i in range(num_classes))
    return Dataset("synthetic", classes, trx, tr_y, tex, te_y, mean, std, source="synthetic")


# --------------------------------------------------------------------------- real data


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


def _load_real(cfg: DataConfig) -> Dataset:
    cache = default_cache_dir(cfg)
    if cfg.root is None:
        if cfg.name != "cifar10":
            raise DatasetError("data.root: an ImageFolder dataset needs a path (a folder or a .tar.gz)")
        root = cache / "data" / "cifar10"
    else:
        root = Path(cfg.root).expanduser()
    archive = root.is_file()
    if archive:
        root = _extract_archive(root, cache)
    found = _find_layout(root) if root.is_dir() else None
    if found is None:
        if cfg.name == "cifar10" and cfg.download and not archive:
            if not root.exists() and root.name.lower().endswith(ARCHIVE_SUFFIXES):
                # a mistyped archive path: not a folder to download CIFAR-10 into
                raise DatasetError(f"data.root: {root} does not exist")
            _download_cifar10(root)
            found = _find_layout(root)
        if found is None:
            raise DatasetError(_missing_message(cfg, root))
    kind, path = found
    if kind == "imagefolder" and cfg.name != "cifar10":
        streamed = _maybe_stream(path, cfg)
        if streamed is not None:
            return streamed
    key = _cache_key(kind, path, cfg.image_size)
    arrays = _read_cache(cache / "decoded" / key)
    if arrays is None:
        arrays = _decode_cifar_batches(path) if kind == "cifar-batches" else _decode_imagefolder(path, cfg.image_size)
        _write_cache(cache / "decoded" / key, arrays)
    classes = tuple(arrays["classes"])
    if cfg.name == "cifar10":
        if classes != CIFAR10_CLASSES:
            raise DatasetError(
                f"data.root: {path} is not CIFAR-10: its classes are {', '.join(classes[:12])}"
                f"; use data.name=imagefolder for another dataset"
            )
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = tuple(arrays["mean"]), tuple(arrays["std"])
    t = {k: torch.from_numpy(arrays[k]) for k in ("train_x", "train_y", "test_x", "test_y")}
    return Dataset(cfg.name, classes, t["train_x"], t["train_y"].long(), t["test_x"], t["test_y"].long(),
                   mean, std, source=str(path))


def _load_gtsrb(cfg: DataConfig) -> Dataset:
    """GTSRB through torchvision.datasets.GTSRB (its own download, checksummed), decoded once into
    the cache at ``data.image_size`` (default 32) px: the images come in many sizes."""
    from torchvision.datasets import GTSRB

    cache = default_cache_dir(cfg)
    root = Path(cfg.root).expanduser() if cfg.root else cache / "data" / "gtsrb"
    if root.is_file():
        root = _extract_archive(root, cache)
    size = cfg.image_size or 32
    splits = {}
    for split in ("train", "test"):
        try:
            splits[split] = GTSRB(str(root), split=split, download=cfg.download)._samples
        except Exception as e:  # not there and no download (offline, or download off)
            raise DatasetError(
                f"no GTSRB {split} split at {root} ({' '.join(str(e).split())[:200]}). Provide it with "
                "`--set data.root=<folder>` holding torchvision's layout (gtsrb/GTSRB/Training/<class>/*.ppm, "
                "gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv), or allow data.download"
            ) from None
    src = root / "gtsrb"
    key = _cache_key("gtsrb", src, size)
    arrays = _read_cache(cache / "decoded" / key)
    if arrays is None:
        trx, tr_y = _decode_files(splits["train"], size)
        tex, te_y = _decode_files(splits["test"], size)
        n = int(max(tr_y.max(), te_y.max())) + 1
        mean, std = _channel_stats(torch.from_numpy(trx))
        arrays = {"train_x": trx, "train_y": tr_y, "test_x": tex, "test_y": te_y,
                  "classes": [str(i) for i in range(max(n, 43))], "mean": list(mean), "std": list(std)}
        _write_cache(cache / "decoded" / key, arrays)
    t = {k: torch.from_numpy(arrays[k]) for k in _ARRAY_KEYS}
    return Dataset("gtsrb", tuple(arrays["classes"]), t["train_x"], t["train_y"].long(), t["test_x"],
                   t["test_y"].long(), tuple(arrays["mean"]), tuple(arrays["std"]), source=str(src))


def _missing_message(cfg: DataConfig, root: Path) -> str:
    what = "CIFAR-10" if cfg.name == "cifar10" else "ImageFolder dataset"
    tried = f"no {what} found at {root}"
    if cfg.name == "cifar10" and cfg.download:
        tried += " and the download failed"
    return (
        f"{tried}. Provide one with `make quickstart DATA=<path>` or `--set data.root=<path>`: a "
        "torchvision CIFAR-10 folder (cifar-10-batches-py), an ImageFolder tree with train/ and "
        "test/ (or val/), or a .tar.gz of either (e.g. ../shared/data/cifar10-jpeg.tar.gz)"
    )


def _download_cifar10(root: Path) -> None:
    """torchvision's real CIFAR-10 download (checksummed). Failures become DatasetError."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as e:
        raise DatasetError(
            f"could not download CIFAR-10 into {root}: {' '.join(str(e).split())}. Provide the "
            "dataset with `make quickstart DATA=<path>` or `--set data.root=<path>` (a torchvision "
            "CIFAR-10 folder, an ImageFolder tree, or a .tar.gz of either such as "
            "../shared/data/cifar10-jpeg.tar.gz)"
        ) from None


def _find_layout(root: Path, depth: int = 2) -> tuple[str, Path] | None:
    """('cifar-batches', dir) or ('imagefolder', dir), looking a couple of levels down."""
    if (root / "data_batch_1").is_file() and (root / "test_batch").is_file():
        return "cifar-batches", root
    if (root / "cifar-10-batches-py" / "data_batch_1").is_file():
        return "cifar-batches", root / "cifar-10-batches-py"
    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        return "imagefolder", root
    if depth > 0:
        subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        for sub in subdirs:
            found = _find_layout(sub, depth - 1)
            if found:
                return found
    return None


def _extract_archive(archive: Path, cache: Path) -> Path:
    """Extract a .tar(.gz|.bz2|.xz) into the cache, whole or not at all: into a temporary folder
    beside its cache entry, renamed into place only once every member extracted and the archive
    was read to its end (a corrupt member header would otherwise end the archive early, silently)."""
    try:
        is_tar = archive.is_file() and tarfile.is_tarfile(archive)
        st = archive.stat()
    except OSError as e:
        raise DatasetError(f"data.root: cannot read {archive}: {_one_line(e)}") from None
    if not is_tar:
        raise DatasetError(f"data.root: {archive} is neither a folder nor a .tar/.tar.gz archive")
    # v2: trees cached before the end-of-archive check may be partial
    key = hashlib.sha256(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}|v2".encode()).hexdigest()[:16]
    dest = cache / "extracted" / key
    if (dest / ".complete").is_file():
        return dest
    tmp = _cache_temp_dir(cache / "extracted", "extract-")
    try:
        with tarfile.open(archive, tarinfo=_StrictTarInfo) as tf:
            tf.extractall(tmp, filter=_member_filter)
            _check_archive_end(tf)
        (tmp / ".complete").touch()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)):
            raise DatasetError(f"data.root: cannot extract {archive}: {_one_line(e)}") from None
        raise
    _publish(tmp, dest, lambda d: (d / ".complete").is_file())
    return dest


MAX_MEMBER_BYTES = 1 << 30  # one file of a dataset archive (a gzip of zeros expands 1000-fold)


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter (no absolute paths, '..', devices, or links out of the folder),
    and no member larger than MAX_MEMBER_BYTES."""
    member = tarfile.data_filter(member, dest)
    if member.size > MAX_MEMBER_BYTES:
        raise tarfile.ReadError(f"member {member.name!r} declares {member.size:,} bytes (more than "
                                f"{MAX_MEMBER_BYTES:,}): not a dataset file")
    return member


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile takes a header it cannot parse after the first one for the end of the archive and
    silently drops every member from there on; here such a header fails the extraction."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            at = tarfile_.offset
            raise tarfile.SubsequentHeaderError(f"damaged member header at byte {at}: {e}") from None


def _check_archive_end(tf: tarfile.TarFile) -> None:
    """After the end-of-archive block only zero padding may follow, up to the end of the stream,
    which is read to its end (so a gzip CRC or length error shows too)."""
    f = tf.fileobj
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError("data after the end-of-archive marker (a damaged member header?)")


def _cache_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in the cache, renamed into place once its contents are whole."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise DatasetError(f"cannot write to the dataset cache {parent} ({_one_line(e)}); set data.cache_dir or "
                           "PRUNEVISION_CACHE to a writable folder") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _cache_key(kind: str, path: Path, image_size: int | None) -> str:
    """Changes when the source files change (names, sizes, modification times)."""
    h = hashlib.sha256(f"{kind}|{path.resolve()}|{image_size}|v1".encode())
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            try:
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{dirpath}/{f}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:  # a broken link: the listing reports it if it looks like an image
                h.update(f"{dirpath}/{f}|?".encode())
    return h.hexdigest()[:20]


_ARRAY_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _read_cache(d: Path) -> dict | None:
    """A decoded dataset from the cache; None (decode again) when it is missing, damaged or not
    what this module writes."""
    if not (d / "meta.json").is_file():
        return None
    try:
        out = {k: np.load(d / f"{k}.npy", allow_pickle=False) for k in _ARRAY_KEYS}
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError, EOFError):
        return None
    return {**out, **meta} if _valid_cache(out, meta) else None


def _valid_cache(arrays: dict, meta: Any) -> bool:
    if not isinstance(meta, dict):
        return False
    classes, mean, std = meta.get("classes"), meta.get("mean"), meta.get("std")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        return False
    for v in (mean, std):
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(a, (int, float)) and np.isfinite(a) for a in v)):
            return False
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3 or y.ndim != 1 or len(x) != len(y) or not len(y):
            return False
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(classes):
            return False
    return True


def _write_cache(d: Path, arrays: dict) -> None:
    tmp = _cache_temp_dir(d.parent, "decode-")
    try:
        for k in _ARRAY_KEYS:
            np.save(tmp / f"{k}.npy", arrays[k], allow_pickle=False)
        meta = {k: list(arrays[k]) for k in ("classes", "mean", "std")}
        (tmp / "meta.json").write_text(json.dumps(meta))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise DatasetError(f"cannot write the decoded dataset to the cache {d.parent} ({_one_line(e)}); set "
                               "data.cache_dir or PRUNEVISION_CACHE to a folder with space") from None
        raise
    _publish(tmp, d, lambda x: _read_cache(x) is not None)


def _publish(tmp: Path, dest: Path, valid) -> None:
    """Move a finished folder into place. Concurrent trials may decode the same data at once:
    the first to finish wins, the others drop their copy; a damaged old copy is replaced."""
    try:
        os.replace(tmp, dest)
        return
    except OSError:
        pass
    if dest.exists() and valid(dest):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = dest.with_name(f"{dest.name}.old-{os.getpid()}")
    os.replace(dest, trash)
    os.replace(tmp, dest)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- decoders


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dicts, lists and strings; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file → (N×3×32×32 uint8, N labels)."""
    try:
        with open(path, "rb") as f:
            d = _ArraysOnlyUnpickler(io.BufferedReader(f), encoding="bytes").load()
        data = d[b"data"] if b"data" in d else d["data"]
        labels = d[b"labels"] if b"labels" in d else d["labels"]
        x, y = np.asarray(data), np.asarray(labels)
        if x.dtype != np.uint8 and not (np.issubdtype(x.dtype, np.integer) and x.size
                                        and 0 <= x.min() and x.max() <= 255):
            raise ValueError(f"pixel values must be bytes (0-255), got {x.dtype}")
        x = x.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be a list of whole numbers, got {y.dtype} of shape {y.shape}")
        y = y.astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError,
            OverflowError, MemoryError, RecursionError) as e:
        raise DatasetError(f"{path} is not a readable CIFAR-10 batch file: {_one_line(e)}") from None
    except OSError as e:
        raise DatasetError(f"cannot read CIFAR-10 batch file {path}: {_one_line(e)}") from None
    bad = (y < 0) | (y >= len(CIFAR10_CLASSES))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{path}: image {i} has label {int(y[i])}, out of range 0-{len(CIFAR10_CLASSES) - 1} "
                           f"(CIFAR-10 has {len(CIFAR10_CLASSES)} classes); {int(bad.sum())} label(s) out of range")
    return x, y


def _decode_cifar_batches(d: Path) -> dict:
    train = [read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6) if (d / f"data_batch_{i}").is_file()]
    test = read_cifar_batch(d / "test_batch")
    trx = np.concatenate([t[0] for t in train])
    mean, std = _channel_stats(torch.from_numpy(trx))
    return {"train_x": trx, "train_y": np.concatenate([t[1] for t in train]),
            "test_x": test[0], "test_y": test[1], "classes": list(CIFAR10_CLASSES),
            "mean": list(mean), "std": list(std)}


def _decode_imagefolder(root: Path, image_size: int | None) -> dict:
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    classes = _class_folders(train_dir)
    trx, tr_y = _decode_split(train_dir, classes, image_size, every_class=True)
    tex, te_y = _decode_split(test_dir, classes, image_size or trx.shape[-1], every_class=False)
    mean, std = _channel_stats(torch.from_numpy(trx))
    return {"train_x": trx, "train_y": tr_y, "test_x": tex, "test_y": te_y, "classes": classes,
            "mean": list(mean), "std": list(std)}


def _class_folders(train_dir: Path) -> list[str]:
    try:
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DatasetError(f"cannot list {train_dir}: {_one_line(e)}") from None
    if not classes:
        raise DatasetError(f"{train_dir} holds no class folders")
    return classes


def _list_split(split: Path, classes: list[str], every_class: bool) -> tuple[list[str], list[int]]:
    """Image paths and labels of one split, class by class. ``every_class``: each class folder
    must hold an image (the training split: a class with no images cannot be learned)."""
    paths, labels = [], []
    for i, c in enumerate(classes):
        cdir = split / c
        found = 0
        for p in sorted(cdir.rglob("*")) if cdir.is_dir() else []:
            if p.suffix.lower() not in _IMAGE_EXT or p.is_dir():
                continue
            if not p.is_file():  # a broken or looping link, a FIFO, a device: reading it could hang
                raise DatasetError(f"{p} is not a regular file (a broken or looping link, or a special file)")
            paths.append(str(p))
            labels.append(i)
            found += 1
        if every_class and not found:
            raise DatasetError(f"class folder {cdir} holds no images ({', '.join(sorted(_IMAGE_EXT))}); "
                               "add some or remove the folder")
    if not paths:
        raise DatasetError(f"{split} holds no images in class folders ({', '.join(classes[:5])}, ...)")
    return paths, labels


def _decode_split(split: Path, classes: list[str], image_size: int | None, every_class: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    files, labels = _list_split(split, classes, every_class)
    return _decode_files(list(zip(files, labels)), image_size, where=str(split))


# Larger images are refused before they are decoded: a small PNG can declare 20000×20000 pixels
# (1.2 GB decoded) — a decompression bomb. 64 MP is above any camera's photos, far above what
# a CNN here trains on (images are resized to data.image_size), and below PIL's own 89 MP warning.
MAX_IMAGE_PIXELS = 64_000_000


@contextmanager
def _bomb_warning_off() -> Iterator[None]:
    """PIL warns above its own (higher) limit; MAX_IMAGE_PIXELS refuses those images anyway, with
    one line. Entered once around a decoding pool: warning filters are process-wide."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def open_image(path: str | Path):
    """An image file as an RGB PIL image, or one DatasetError line naming the file (unreadable,
    corrupt, or over MAX_IMAGE_PIXELS)."""
    from PIL import Image

    def too_large(size: str) -> DatasetError:
        return DatasetError(f"image {path} ({size} pixels) is over the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels "
                            "(a decompression bomb, or far larger than training needs); shrink or remove it")

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise too_large(f"{im.width}×{im.height}")
            return im.convert("RGB")
    except DatasetError:
        raise
    except Image.DecompressionBombError:  # PIL's own check, above twice its limit
        raise too_large(f"over {2 * Image.MAX_IMAGE_PIXELS:,}") from None
    except Exception as e:  # any decoder failure on a damaged file: name the file, one line
        raise DatasetError(f"cannot decode image {path}: {_one_line(e)}") from None


def _decode_files(samples: list[tuple], image_size: int | None, where: str = "the dataset"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Decode (path, label) pairs into N×3×H×W uint8, resized to image_size when given."""
    from PIL import Image

    if not samples:
        raise DatasetError(f"{where} holds no images")
    files = [Path(p) for p, _ in samples]
    labels = [int(c) for _, c in samples]

    def decode(p: Path) -> np.ndarray:
        im = open_image(p)
        if image_size and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)

    with _bomb_warning_off(), ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as ex:
        imgs = list(ex.map(decode, files, chunksize=256))
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise DatasetError(
            f"images in {where} have different sizes ({len(shapes)} distinct); set data.image_size to resize them"
        )
    x = np.stack(imgs).transpose(0, 3, 1, 2).copy()
    return x, np.asarray(labels, dtype=np.int64)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x[: 20000].float() / 255.0
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


# --------------------------------------------------------------------------- large images: streamed


class ImageFiles:
    """Images left on disk (ImageNet-sized pictures): paths, their decoded side length and the
    device batches go to. Indexes like a tensor of images (long or bool index tensors, slices),
    so subsets and class selection work on it unchanged; :class:`DeviceLoader` turns it into
    batches through a torch DataLoader with worker processes."""

    def __init__(self, paths: list[str], size: int, workers: int = 2, device: torch.device | str = "cpu"):
        self.paths, self.size, self.workers = list(paths), int(size), int(workers)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __getitem__(self, idx) -> ImageFiles:
        if isinstance(idx, slice):
            sel = self.paths[idx]
        else:
            idx = torch.as_tensor(idx).cpu()
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            sel = [self.paths[int(i)] for i in idx]
        return ImageFiles(sel, self.size, self.workers, self.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageFiles:
        return ImageFiles(self.paths, self.size, self.workers, device)

    def cpu(self) -> ImageFiles:
        return self.to("cpu")


class _FileImages(torch.utils.data.Dataset):
    """Decode one image: random-resized crop and flip for training, resize and centre crop for
    evaluation; uint8 CHW out (normalised on the device, as for in-memory data)."""

    def __init__(self, paths: list[str], labels: torch.Tensor, size: int, train: bool):
        from torchvision.transforms import v2

        self.paths, self.labels = paths, labels.cpu()
        self.tf = (v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                               v2.RandomHorizontalFlip()]) if train else
                   v2.Compose([v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with _bomb_warning_off():  # one image at a time (a worker process, or the probe below)
            img = self.tf(open_image(self.paths[i]))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), self.labels[i]


def _maybe_stream(root: Path, cfg: DataConfig) -> Dataset | None:
    """An ImageFolder of large images as :class:`ImageFiles` (None when the images are small)."""
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    classes = _class_folders(train_dir)
    tr_p, tr_l = _list_split(train_dir, classes, every_class=True)
    size = cfg.image_size
    if size is None:
        with _bomb_warning_off():
            size = min(open_image(tr_p[0]).size)
    if size <= cfg.stream_above:
        return None
    te_p, te_l = _list_split(test_dir, classes, every_class=False)
    # normalisation statistics from up to 256 evaluation-style crops of training images
    probe = _FileImages(tr_p[:: max(1, len(tr_p) // 256)][:256], torch.tensor(tr_l), size, train=False)
    sample = torch.stack([probe[i][0] for i in range(len(probe))])
    mean, std = _channel_stats(sample)
    return Dataset(cfg.name, tuple(classes), ImageFiles(tr_p, size, cfg.workers), torch.tensor(tr_l),
                   ImageFiles(te_p, size, cfg.workers), torch.tensor(te_l), mean, std, source=str(root))


class _Batches:
    """What both loaders share: batch counts (training drops the last partial batch), the epoch
    that seeds shuffling, and normalisation on the device."""

    def __init__(self, x, y: torch.Tensor, batch_size: int, mean, std, *, train: bool, augment: bool = True,
                 seed: int = 0, channels_last: bool = False, dtype: torch.dtype = torch.float32):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.train, self.augment, self.seed = train, augment and train, seed
        self.channels_last, self.dtype, self.epoch = channels_last, dtype, 0
        dev = x.device
        self.mean = torch.tensor(mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=dev, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.train and n >= self.batch_size else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class FileLoader(_Batches):
    """Batches of streamed images (:class:`ImageFiles`) from a torch DataLoader with workers,
    normalised on the training device; same interface and batch counts as DeviceLoader."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = _FileImages(self.x.paths, self.y, self.x.size, train=self.augment)
        sampler = None
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            sampler = torch.utils.data.RandomSampler(ds, generator=g)
        dev = self.x.device
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.x.workers,
            drop_last=self.train and len(ds) >= self.batch_size, pin_memory=dev.type == "cuda")
        try:
            for xb, yb in loader:
                xb = xb.to(dev, non_blocking=True).float()
                xb = ((xb - self.mean) / self.std).to(self.dtype)
                if self.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yield xb, yb.to(dev, non_blocking=True)
        except DatasetError as e:  # from a worker process: its message is a whole traceback
            last = (str(e).strip().splitlines() or [""])[-1]
            raise DatasetError(last.partition("DatasetError: ")[2] or last) from None


# --------------------------------------------------------------------------- batches


class DeviceLoader(_Batches):
    """Batches from uint8 tensors that already live on the training device.

    Augmentation (reflect pad-and-crop by ``pad`` pixels, horizontal flip) is done for the
    whole batch at once on the device. Shuffling is seeded per epoch. Given streamed images
    (:class:`ImageFiles`) instead of a tensor, it is a :class:`FileLoader`.
    """

    def __new__(cls, x, *args, **kwargs):
        if isinstance(x, ImageFiles):
            kwargs.pop("pad", None)
            return FileLoader(x, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, mean, std, *, train: bool,
                 augment: bool = True, pad: int = 4, seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__(x, y, batch_size, mean, std, train=train, augment=augment, seed=seed,
                         channels_last=channels_last, dtype=dtype)
        self.pad = pad

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        dev = self.x.device
        if self.train:
            g = torch.Generator(device="cpu").manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g).to(dev)
        else:
            order = torch.arange(n, device=dev)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb = self.x[idx].float()
            if self.augment:
                xb = self._augment(xb, g)
            xb = ((xb - self.mean) / self.std).to(self.dtype)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]

    def _augment(self, xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = xb.shape
        dev = xb.device
        flip = (torch.rand(n, generator=g) < 0.5).to(dev)
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
        if self.pad <= 0:
            return xb
        p = self.pad
        padded = F.pad(xb, (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(dev)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g).to(dev)
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        rows = (dy.view(n, 1) + ar_h).view(n, 1, h, 1).expand(n, 3, h, w + 2 * p)
        cols = (dx.view(n, 1) + ar_w).view(n, 1, 1, w).expand(n, 3, h, w)
        return padded.gather(2, rows).gather(3, cols)

"""Pruned models saved as data: the base architecture, the kept widths, the tensors.

A pruned checkpoint is one safetensors file. Its metadata names the builder and its config
(``model`` section, classes, input size) and lists each resized layer's widths; the tensors are
the state dict. :func:`load_pruned` builds the base network with the same registry, resizes the
listed layers and loads the tensors: nothing in the file is ever executed, so a checkpoint from
someone else cannot run code. A checksum over metadata and tensors catches damaged or edited
files.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from prunevision.config import MAX_IMAGE_SIZE, ConfigError, ModelConfig
from prunevision.fsutil import atomic_write, ensure_dir, require_file

FORMAT = "prunevision-pruned"
VERSION = 1


class PrunedCheckpointError(RuntimeError):
    """A pruned checkpoint is missing, corrupt, tampered with or does not fit its architecture."""


def layer_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel widths of every conv, norm and linear layer."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"out": m.num_features}
        elif isinstance(m, nn.GroupNorm):
            out[name] = {"out": m.num_channels}
    return out


def _digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_pruned(
    model: nn.Module,
    path: str | Path,
    model_cfg: ModelConfig,
    num_classes: int,
    image_size: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (gate-free, possibly pruned) as a safetensors file with its description."""
    path = Path(path)
    ensure_dir(path.parent)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_cfg.__dict__.items()},
        "num_classes": num_classes,
        "image_size": image_size,
        "layers": layer_widths(model),
        # the hybrid's backbones still run (indices), when pruning dropped some
        **({"hybrid_active": list(model.active)} if isinstance(getattr(model, "active", None), tuple) else {}),
        "extra": extra or {},
    }
    meta_json = json.dumps(meta, sort_keys=True)
    return atomic_write(path, save(tensors, metadata={"prunevision": meta_json, "sha256": _digest(meta_json, tensors)}))


# Bounds on what a checkpoint's metadata may declare. The checksum only catches damage (anyone
# can recompute it after an edit), so every field is checked before anything is built from it:
# nothing is allocated from a declared size without such a bound.
MAX_CLASSES = 100_000
MAX_WIDTH = 1 << 16  # channels of one layer
MAX_FUSION_CHANNELS = 16_384
MAX_BACKBONES = 8
# the base network built before its layers are resized: at most this many elements, or this many
# times the file's own (a pruned model keeps a share of its base network; a tiny file declaring a
# giant base is edited)
MAX_BASE_ELEMENTS, MAX_BASE_RATIO = 256_000_000, 1000


def read_pruned(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of a pruned checkpoint, checked: format, version, checksum, and every
    metadata field (types, ranges, layer widths against the tensors' shapes)."""
    path = require_file(path, "pruned checkpoint", PrunedCheckpointError)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: whatever the reader says of a bad file
        raise PrunedCheckpointError(
            f"{path} is not a readable safetensors file (corrupt, truncated, or not a prunevision "
            f"pruned checkpoint): {_one_line(e)[:200]}"
        ) from None
    meta_json = header.get("prunevision")
    if meta_json is None:
        raise PrunedCheckpointError(f"{path} has no prunevision metadata: not a pruned checkpoint")
    try:
        meta = json.loads(meta_json)
    except (ValueError, RecursionError):
        raise PrunedCheckpointError(f"{path}: damaged metadata (not JSON)") from None
    if not isinstance(meta, dict):
        raise PrunedCheckpointError(f"{path}: damaged metadata (not a JSON object)")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PrunedCheckpointError(f"{path}: unsupported format {str(meta.get('format'))[:40]} "
                                    f"v{str(meta.get('version'))[:20]}")
    if header.get("sha256") != _digest(meta_json, tensors):
        raise PrunedCheckpointError(f"{path}: checksum mismatch: the file was damaged or edited")
    try:
        _check_meta(meta, tensors)
    except ValueError as e:
        raise PrunedCheckpointError(f"{path}: invalid metadata: {_one_line(e)[:300]}") from None
    return meta, tensors


def model_config(meta: dict[str, Any]) -> ModelConfig:
    """The checkpoint's ``model`` section as a validated ModelConfig (known model names only)."""
    from prunevision.config import from_dict

    m = meta.get("model")
    if not isinstance(m, dict):
        raise ValueError("model: not a mapping")
    try:
        return from_dict({"model": m}).model
    except ConfigError as e:
        raise ValueError(str(e)) from None


def _whole(key: str, v: Any, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ValueError(f"{key}: {str(v)[:40]!r} is not a whole number in [{low}, {high}]")
    return v


def _check_meta(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Every field a rebuild reads, against bounds and against the tensors actually stored."""
    mcfg = model_config(meta)
    n_cls = _whole("num_classes", meta.get("num_classes"), 2, MAX_CLASSES)
    _whole("image_size", meta.get("image_size"), 8, MAX_IMAGE_SIZE)
    _whole("model.fusion_channels", mcfg.fusion_channels, 1, MAX_FUSION_CHANNELS)
    if len(mcfg.backbones) > MAX_BACKBONES:
        raise ValueError(f"model.backbones: {len(mcfg.backbones)} backbones (at most {MAX_BACKBONES})")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError("layers: not a mapping of layer names to widths")
    outs = set()
    for name, w in layers.items():
        outs.add(_check_layer(name, w, tensors))
    if n_cls not in outs:
        raise ValueError(f"num_classes {n_cls} is the width of no layer in the file")
    if "hybrid_active" in meta:
        act = meta["hybrid_active"]
        if mcfg.name != "hybrid" or not isinstance(act, list) or not act or len(set(map(str, act))) != len(act):
            raise ValueError("hybrid_active: a list of distinct backbone indices, for the hybrid only")
        for i in act:
            _whole("hybrid_active", i, 0, len(mcfg.backbones) - 1)
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError("extra: not a mapping")
    for key in ("mean", "std"):
        v = extra.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in v)):
            raise ValueError(f"extra.{key}: not 3 numbers")
    classes = extra.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError("extra.classes: not a list of names")


def _check_layer(name: Any, w: Any, tensors: dict[str, torch.Tensor]) -> int:
    """One resized layer's widths: whole numbers in range, and the shape of its stored weight."""
    if not isinstance(name, str) or not isinstance(w, dict) or not w or set(w) - {"in", "out", "groups"}:
        raise ValueError(f"layers: bad entry {str(name)[:60]!r}")
    for k, v in w.items():
        _whole(f"layers.{name}.{k}", v, 1, MAX_WIDTH)
    if "out" not in w:
        raise ValueError(f"layers.{name}: no output width")
    weight = tensors.get(f"{name}.weight")
    if weight is None:
        weight = tensors.get(f"{name}.running_mean")  # a norm layer without affine weights
    if weight is None:
        raise ValueError(f"layers.{name}: the file holds no weight for it")
    shape = tuple(weight.shape)
    if "groups" in w:  # Conv2d
        if "in" not in w or w["in"] % w["groups"] or w["out"] % w["groups"]:
            raise ValueError(f"layers.{name}: widths {w} do not divide into its groups")
        ok = len(shape) == 4 and shape[:2] == (w["out"], w["in"] // w["groups"])
    elif "in" in w:  # Linear
        ok = shape == (w["out"], w["in"])
    else:  # a norm layer
        ok = shape == (w["out"],)
    if not ok:
        raise ValueError(f"layers.{name}: widths {w} do not match its stored weight of shape {list(shape)}")
    return w["out"]


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pruned model from its checkpoint (same registry builder, resized layers). The
    rebuild is tried on PyTorch's meta device first (shapes only, nothing allocated): a file whose
    metadata does not fit its tensors stops there."""
    meta, tensors = read_pruned(path)
    path = Path(path)
    mcfg = model_config(meta)
    file_elements = sum(t.numel() for t in tensors.values())
    try:
        with torch.device("meta"):
            probe = _base_model(mcfg, meta, path)
    except PrunedCheckpointError:
        raise
    except Exception:  # some builders compute with tensor values (RegNet): no dry run, the bounds hold
        probe = None
    if probe is not None:
        base = sum(t.numel() for t in probe.state_dict().values())
        if base > max(MAX_BASE_ELEMENTS, MAX_BASE_RATIO * file_elements):
            raise PrunedCheckpointError(f"{path}: its metadata declares a {mcfg.name} of {base:,} elements for "
                                        f"{file_elements:,} stored: edited metadata?")
        with torch.device("meta"):
            _fit(probe, meta, tensors, path)
            _check_runs(probe, meta, path, "meta")
    model = _base_model(mcfg, meta, path)
    _fit(model, meta, tensors, path)
    state = OrderedDict(tensors)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # module versions, from the builder
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PrunedCheckpointError(f"{path} does not fit {mcfg.name}: {_one_line(e)[:300]}") from None
    model.to(device).eval()
    _check_runs(model, meta, path, device)
    return model


def _base_model(mcfg: ModelConfig, meta: dict[str, Any], path: Path) -> nn.Module:
    """The registry's network for the checkpoint, before its layers are resized."""
    from prunevision.models import create_model
    from prunevision.prune import strip_gates

    model = create_model(mcfg, meta["num_classes"], meta["image_size"], pretrained=False)
    strip_gates(model)  # saved models are gate-free: PrunableLinear layers are plain linear layers
    if "hybrid_active" in meta:
        try:
            model.keep_backbones(meta["hybrid_active"])
        except (AttributeError, ValueError, TypeError) as e:
            raise PrunedCheckpointError(f"{path}: bad hybrid_active {meta['hybrid_active']!r}: {e}") from None
    return model


def _fit(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Resize the listed layers and give every parameter and buffer its stored shape."""
    modules = dict(model.named_modules())
    for name, w in meta["layers"].items():
        m = modules.get(name)
        if m is None:
            raise PrunedCheckpointError(f"{path}: layer {name!r} does not exist in {meta['model'].get('name')}")
        _resize(m, w, path, name)
    _reshape_to(model, tensors, path)


def _check_runs(model: nn.Module, meta: dict[str, Any], path: Path, device) -> None:
    """The rebuilt model runs on one image of its size and gives one logit per class."""
    s = meta["image_size"]
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, s, s, device=device))
    except NotImplementedError as e:
        if str(device) == "meta":
            return  # an operator with no meta kernel: the real run checks
        raise PrunedCheckpointError(f"{path}: the rebuilt model does not run: {_one_line(e)[:300]}") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise PrunedCheckpointError(f"{path}: the rebuilt model does not run: {_one_line(e)[:300]}") from None
    if tuple(out.shape) != (1, meta["num_classes"]):
        raise PrunedCheckpointError(f"{path}: the rebuilt model gives outputs of shape {list(out.shape)}, not "
                                    f"[1, {meta['num_classes']}] (num_classes)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _resize(m: nn.Module, w: dict[str, int], path: Path, name: str) -> None:
    want = ({"in", "out", "groups"} if isinstance(m, nn.Conv2d) else {"in", "out"} if isinstance(m, nn.Linear)
            else {"out"} if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) else None)
    if want != set(w):
        raise PrunedCheckpointError(f"{path}: layer {name!r} is a {type(m).__name__}, widths {w} do not describe it")
    if isinstance(m, nn.Conv2d):
        m.in_channels, m.out_channels, m.groups = w["in"], w["out"], w["groups"]
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = w["in"], w["out"]
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.num_features = w["out"]
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = w["out"]


def _reshape_to(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Give every parameter and buffer the shape stored in the file (the widths were set above)."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise PrunedCheckpointError(
            f"{path} does not match its architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, t in tensors.items():
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        cur = getattr(mod, attr)
        if cur.shape == t.shape:
            continue
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype), requires_grad=cur.requires_grad)
        else:
            mod._buffers[attr] = torch.empty(t.shape, dtype=t.dtype)

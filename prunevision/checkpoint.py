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
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from prunevision.config import ConfigError, ModelConfig

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
    path.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"prunevision": meta_json, "sha256": _digest(meta_json, tensors)})
    os.replace(tmp, path)
    return path


def read_pruned(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of a pruned checkpoint, checked (format, version, checksum)."""
    path = Path(path)
    if not path.is_file():
        raise PrunedCheckpointError(f"pruned checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrunedCheckpointError(
            f"{path} is not a readable safetensors file (corrupt, truncated, or not a prunevision "
            f"pruned checkpoint): {' '.join(str(e).split())[:200]}"
        ) from None
    meta_json = header.get("prunevision")
    if meta_json is None:
        raise PrunedCheckpointError(f"{path} has no prunevision metadata: not a pruned checkpoint")
    try:
        meta = json.loads(meta_json)
    except ValueError:
        raise PrunedCheckpointError(f"{path}: damaged metadata") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PrunedCheckpointError(f"{path}: unsupported format {meta.get('format')} v{meta.get('version')}")
    if header.get("sha256") != _digest(meta_json, tensors):
        raise PrunedCheckpointError(f"{path}: checksum mismatch: the file was damaged or edited")
    return meta, tensors


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pruned model from its checkpoint (same registry builder, resized layers)."""
    from prunevision.models import create_model

    meta, tensors = read_pruned(path)
    try:
        mcfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()})
    except (TypeError, ConfigError) as e:
        raise PrunedCheckpointError(f"{path}: its model description is invalid: {e}") from None
    from prunevision.prune import strip_gates

    model = create_model(mcfg, int(meta["num_classes"]), int(meta["image_size"]), pretrained=False)
    strip_gates(model)  # saved models are gate-free: PrunableLinear layers are plain linear layers
    if "hybrid_active" in meta:
        try:
            model.keep_backbones(meta["hybrid_active"])
        except (AttributeError, ValueError, TypeError) as e:
            raise PrunedCheckpointError(f"{path}: bad hybrid_active {meta['hybrid_active']!r}: {e}") from None
    modules = dict(model.named_modules())
    for name, w in meta["layers"].items():
        m = modules.get(name)
        if m is None:
            raise PrunedCheckpointError(f"{path}: layer {name!r} does not exist in {mcfg.name}")
        _resize(m, w)
    _reshape_to(model, tensors, path)
    state = OrderedDict(tensors)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # module versions, from the builder
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PrunedCheckpointError(f"{path} does not fit {mcfg.name}: {' '.join(str(e).split())[:300]}") from None
    model.to(device).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, meta["image_size"], meta["image_size"], device=device))
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise PrunedCheckpointError(f"{path}: the rebuilt model does not run: {msg}") from None
    return model


def _resize(m: nn.Module, w: dict[str, int]) -> None:
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

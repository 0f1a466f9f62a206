"""Model names: the built-in ones, those registered with :func:`register_model`, and any
torchvision classifier as ``torchvision:<name>``. Below the config (which checks names with it) and
the model builders (which register themselves here), so that neither imports the other."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from prunevision.errors import ConfigError

TORCHVISION_SHORT_NAMES = ("resnet18", "mobilenet_v3_small", "mobilenet_v2", "efficientnet_b0")
# built by prunevision.models (tests/test_models.py checks that it registers each of them)
BUILTIN_MODELS = ("small_cnn", "hybrid", *TORCHVISION_SHORT_NAMES)

ModelBuilder = Callable[[Any, int, int], Any]  # (ModelConfig, num_classes, image_size) → nn.Module
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(fn: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Model names (``torchvision:<name>`` accepts any torchvision classifier besides)."""
    return sorted(set(BUILTIN_MODELS) | set(_REGISTRY))


@lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str, key: str = "model.name") -> None:
    if name in BUILTIN_MODELS or name in _REGISTRY:
        return
    if name.startswith("torchvision:"):
        tv = name.split(":", 1)[1]
        if tv in torchvision_classifiers():
            return
        close = difflib.get_close_matches(tv, torchvision_classifiers(), n=1)
        hint = f" (did you mean 'torchvision:{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: {tv!r} is not a torchvision classification model{hint}")
    close = difflib.get_close_matches(name, list_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{key}: unknown model {name!r}{hint}; choose from {', '.join(list_models())} "
        "or torchvision:<name>"
    )

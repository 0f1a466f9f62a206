"""Where a trial runs: its Ray node, the GPUs Ray assigned it and the torch device it trains on.

Ray schedules GPUs as logical resources. A trial that asks for ``resources.gpu: 0.25`` is given
one GPU id (which up to three other such trials share), and Ray sets ``CUDA_VISIBLE_DEVICES`` to
the ids it assigned before the trial starts, so torch sees those GPUs only, as ``cuda:0``,
``cuda:1``, ... A trial that asks for no GPU gets no id, but Ray 2.60 leaves
``CUDA_VISIBLE_DEVICES`` as it was for it (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` is off by
default): every GPU of the node stays visible, so the device is chosen here, never left to torch.

``train.device`` inside a trial:

- ``auto``: the first GPU Ray assigned; the CPU when Ray assigned none (``gpu: 0``), and also
  when Ray assigned a GPU that CUDA cannot see (a node that declares GPUs it does not have, as in
  the tests): the device recorded is then ``cpu`` next to a non-empty ``gpu_ids``.
- ``cpu``: the CPU.
- ``cuda`` / ``cuda:N``: the first / N-th GPU *Ray assigned to this trial* (not the machine's N-th
  GPU, which may be another trial's); an error when Ray assigned fewer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


class PlacementError(RuntimeError):
    """The trial's train.device does not fit the GPUs Ray assigned it."""


def cuda_index(gpu_id: Any, visible: str | None) -> int:
    """torch's index of a GPU Ray assigned: its position in ``CUDA_VISIBLE_DEVICES``, which Ray sets
    to the trial's GPUs (so the first is cuda:0). Without the variable (Ray told not to set it:
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) torch numbers every GPU by its own id."""
    try:
        if visible is None:
            return int(gpu_id)
        return [v.strip() for v in visible.split(",") if v.strip()].index(str(gpu_id))
    except ValueError:
        raise PlacementError(f"GPU {gpu_id} that Ray assigned is not among the GPUs torch can see "
                             f"(CUDA_VISIBLE_DEVICES={visible!r})") from None


def trial_device(requested: str, gpu_ids: Sequence[Any], cuda_available: bool, visible: str | None) -> str:
    """The torch device a Ray trial trains on (see the module's docstring)."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        if not gpu_ids or not cuda_available:
            return "cpu"
        return f"cuda:{cuda_index(gpu_ids[0], visible)}"
    n = int(requested.partition(":")[2] or 0)  # cuda or cuda:N (validated by the config)
    if n >= len(gpu_ids):
        raise PlacementError(
            f"train.device={requested}: Ray assigned this trial {len(gpu_ids)} GPU(s) {list(gpu_ids)}; ask for "
            f"{'a GPU' if n == 0 else f'{n + 1} GPUs'} with resources.gpu, or use train.device=auto")
    if not cuda_available:
        raise PlacementError(f"train.device={requested}: Ray assigned GPU(s) {list(gpu_ids)} but CUDA sees no GPU "
                             "on this node")
    return f"cuda:{cuda_index(gpu_ids[n], visible)}"


def current_placement(requested: str) -> dict[str, Any]:
    """This trial's node, GPU ids, visible devices and training device (inside a Ray worker)."""
    import ray
    import torch

    gpu_ids = list(ray.get_gpu_ids())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": gpu_ids,
            "cuda_visible_devices": visible,
            "device": trial_device(requested, gpu_ids, torch.cuda.is_available(), visible)}

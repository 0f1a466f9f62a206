"""prunevision: CNNs that learn which channels they can do without.

Gates (sigmoid of a learnable score) sit on every prunable conv's channels; training adds
λ(t) · penalty(gates) to the task loss so that unneeded channels close.
"""

from prunevision.checkpoint import PrunedCheckpointError, load_pruned, save_pruned
from prunevision.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    GateConfig,
    ModelConfig,
    PruneConfig,
    TrainConfig,
    load_config,
)
from prunevision.data import Dataset, DatasetError, load_dataset
from prunevision.export import ExportError, export_onnx
from prunevision.fsutil import OutputError
from prunevision.gates import ChannelGate, PrunableLinear, gate_stats, instrument, iter_gates, penalty
from prunevision.models import (
    PretrainedWeightsError,
    build_gated_model,
    create_model,
    list_models,
    register_model,
)
from prunevision.pipeline import run_training
from prunevision.prune import GateImportance, prune_by_gates, prune_structured, strip_gates
from prunevision.train import CheckpointError, evaluate, fit, load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ExportError",
    "OutputError",
    "GateImportance",
    "PrunedCheckpointError",
    "export_onnx",
    "load_pruned",
    "prune_by_gates",
    "prune_structured",
    "save_pruned",
    "strip_gates",
    "ChannelGate",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "Dataset",
    "DatasetError",
    "ExperimentConfig",
    "GateConfig",
    "ModelConfig",
    "PretrainedWeightsError",
    "PrunableLinear",
    "PruneConfig",
    "TrainConfig",
    "build_gated_model",
    "create_model",
    "evaluate",
    "fit",
    "gate_stats",
    "instrument",
    "iter_gates",
    "list_models",
    "load_checkpoint",
    "load_config",
    "load_dataset",
    "penalty",
    "register_model",
    "run_training",
]

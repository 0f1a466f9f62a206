"""Experiment configuration: one small frozen dataclass per concern.

A config is built from YAML plus ``--set key=value`` overrides (dotted keys such as
``gates.lam``) and validated once, at the edge, before any work starts. Every problem
raises :class:`ConfigError` with a single line that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from prunevision.errors import ConfigError
from prunevision.fsutil import require_file
from prunevision.registry import check_model_name

PenaltyMode = Literal["mean", "sum", "flops"]
Schedule = Literal["constant", "linear", "staged", "cubic"]
GateKind = Literal["sigmoid", "ste", "hard_concrete"]
# τ for hard gates: they are exactly 0 when closed (a deterministic hard-concrete gate can be a small
# positive number when open, so anything under this counts as zero)
HARD_GATE_THRESHOLD = 1e-6
# the largest input side (px) a config or a checkpoint may ask for: classifiers here run at 32-224
# px, and 100,000 px would mean a 1.2 TB batch before the first error
MAX_IMAGE_SIZE = 1024
PruneMethod = Literal[
    "gate",
    "l1_unstructured",
    "random_unstructured",
    "l1_structured",
    "l2_structured",
    "taylor",
    "bn_scale",
    "random_structured",
    "ocap",
    "lrp",
]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small_cnn"
    # None: take the number of classes from the dataset.
    num_classes: Optional[int] = None
    # None: decide from the input size (small-image stem for inputs of 64 px or less).
    small_input: Optional[bool] = None
    # Load ImageNet weights through torchvision's weights API (never a silent fallback).
    pretrained: bool = False
    # Weights enum name ("DEFAULT", "IMAGENET1K_V1") or a local weights file (.pth / .safetensors).
    weights: Optional[str] = None
    # Hybrid ensemble: the backbones side by side and the width of the gated fusion layer.
    backbones: tuple[str, ...] = ("mobilenet_v3_small", "resnet18", "efficientnet_b0")
    fusion_channels: int = 512
    dropout: float = 0.3

    def __post_init__(self) -> None:
        check_model_name(self.name, key="model.name")
        if self.name == "hybrid":
            if not self.backbones:
                raise ConfigError("model.backbones: the hybrid needs at least one backbone")
            for b in self.backbones:
                check_model_name(b, key="model.backbones")
                if b in ("hybrid", "small_cnn"):
                    raise ConfigError(f"model.backbones: {b!r} cannot be a hybrid backbone")
        check_range("model.num_classes", self.num_classes, low=2, optional=True)
        check_range("model.fusion_channels", self.fusion_channels, low=1)
        check_range("model.dropout", self.dropout, low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True)
class DataConfig:
    # cifar10: CIFAR-10 (torchvision batches, ImageFolder tree or .tar.gz of either; downloaded
    # when root holds nothing and download is true). imagefolder: any train/ + test/|val/ tree.
    # synthetic: generated images, for tests and smoke tests only.
    # gtsrb: the German Traffic Sign Recognition Benchmark through torchvision.datasets.GTSRB.
    name: Literal["cifar10", "imagefolder", "gtsrb", "synthetic"] = "cifar10"
    root: Optional[str] = None
    download: bool = True
    # Fraction (0, 1] or count (> 1) of training / test images to use.
    subset: Optional[float] = None
    test_subset: Optional[float] = None
    # Fraction of the (subsetted) training images held out, seeded and stratified per class, as
    # the validation split that training selection, sweep objectives, ASHA and the analysis choose
    # on (val_accuracy); the test split is only reported. 0: no validation split (val_accuracy is
    # then the test accuracy, as before).
    val_split: float = 0.1
    batch_size: int = 256
    eval_batch_size: int = 1024
    # Resize ImageFolder images to this size when decoding (None: keep their own size).
    image_size: Optional[int] = None
    augment: bool = True
    # synthetic only
    num_classes: int = 10
    synthetic_train: int = 512
    synthetic_test: int = 256
    cache_dir: Optional[str] = None
    # Class-aware runs: train, calibrate and evaluate on these classes only (names, or indices
    # into the dataset's class list). class_head=subset: the classifier outputs just these classes
    # (labels renumbered in the order given); full: it keeps every class of the dataset.
    classes: Optional[tuple[str, ...]] = None
    class_head: Literal["subset", "full"] = "subset"
    # ImageFolder images larger than this (side, px, after data.image_size) are not decoded into
    # memory: they stream from disk through a torch DataLoader with `workers` processes.
    stream_above: int = 64
    workers: int = 2

    def __post_init__(self) -> None:
        if self.classes is not None:
            if isinstance(self.classes, (str, int)) or len(self.classes) < 2:
                raise ConfigError("data.classes: a list of at least 2 class names or indices")
            if len({str(c) for c in self.classes}) != len(self.classes):
                raise ConfigError("data.classes: a class is listed twice")
        for key in ("subset", "test_subset"):
            v = getattr(self, key)
            if v is not None and (v <= 0 or (v > 1 and v != int(v))):
                raise ConfigError(
                    f"data.{key}: {v} must be a fraction in (0, 1] or a whole count of images"
                )
        check_range("data.val_split", self.val_split, low=0.0, high=0.5)
        check_range("data.batch_size", self.batch_size, low=1)
        check_range("data.eval_batch_size", self.eval_batch_size, low=1)
        check_range("data.image_size", self.image_size, low=8, high=MAX_IMAGE_SIZE, optional=True)
        check_range("data.stream_above", self.stream_above, low=8)
        check_range("data.workers", self.workers, low=0)
        check_range("data.num_classes", self.num_classes, low=2)
        check_range("data.synthetic_train", self.synthetic_train, low=1)
        check_range("data.synthetic_test", self.synthetic_test, low=1)


@dataclass(frozen=True)
class GateConfig:
    # λ, the penalty weight (0 whenever prune.method is not gate). None: 1.0 in λ mode; with a
    # budget (target_macs) λ is a Lagrange multiplier that training adjusts, and setting it is an error.
    lam: Optional[float] = None
    # sigmoid: soft gates closed under τ; ste: straight-through hard 0/1 gates; hard_concrete: L0 gates.
    # None: ste with a budget (target_macs or target_latency_ms), sigmoid in λ mode, decided on the final
    # config like `importance` (a sweep's base has no budget; its trials do): see `resolved_kind`.
    kind: Optional[GateKind] = None
    # What ranks the channels a budget closes. gradient: the scores learn from the task loss's gradient at the
    # gate and the budget's. fisher: each straight-through gate's score is set, at every projection onto the
    # budget, from a running mean of its squared task gradient (the loss a closed channel adds) per unit of
    # its cost (prunevision/budget.py FisherScores). None: fisher for budgeted straight-through gates, else
    # gradient, decided on the final config (a sweep's base has no budget; its trials do): see
    # `resolved_importance` (benchmarks/RESULTS.md, 3 seeds: resnet18 at 0.5 of the MACs 65.43 % against
    # 60.76 %; small_cnn at 0.5 59.62 % against 59.10 %, at 0.25 58.30 % against 57.34 %).
    importance: Optional[Literal["gradient", "fisher"]] = None
    # Budget mode: the pruned network's MACs as a share of the dense network's, in (0, 1]
    # (0.25 = 4x fewer). Training reaches it by itself (augmented Lagrangian on the expected MACs);
    # the target ramps from 1 after warmup_epochs (default: a third of the epochs) over ramp_epochs
    # (default: half the remaining epochs), then holds (benchmarks/RESULTS.md: small_cnn at 0.5 over 6
    # epochs, a 1-epoch warm-up 59.49 %, 2 epochs 60.08 %, 3 epochs 60.05 %, 4 epochs 57.58 %).
    target_macs: Optional[float] = None
    # Latency budget: the pruned network's ONNX Runtime CPU latency in ms (batch 1, measure.threads threads,
    # what a trial reports as latency_ms), met like a MACs budget through a per-layer latency table measured
    # before training and landed by the clock (the structure timed nearest the request, prunevision/latency.py).
    # One of target_macs and target_latency_ms.
    target_latency_ms: Optional[float] = None
    budget_lr: float = 0.02  # ascent rate of the two Lagrange multipliers (Adam, maximising)
    penalty: PenaltyMode = "mean"
    schedule: Schedule = "constant"
    # linear: ramp length; staged and cubic: penalty-free epochs (None: 0); budget: dense epochs first
    warmup_epochs: Optional[float] = None
    stages: int = 3  # staged: number of equal steps up to λ
    ramp_epochs: Optional[float] = None  # cubic: epochs from warm-up end to full λ (None: to the end)
    init: float = 0.95  # initial gate value: training starts from the dense network
    temperature: float = 1.0
    temperature_final: Optional[float] = None  # anneal T geometrically to this value
    lr: float = 0.01  # gate scores use their own Adam optimiser (see prunevision/train.py)
    skip: tuple[str, ...] = ()  # module names (or prefixes) whose convs get no gate

    def __post_init__(self) -> None:
        check_range("gates.lam", self.lam, low=0.0, optional=True)
        check_range("gates.target_macs", self.target_macs, low=0.0, high=1.0, low_open=True, optional=True)
        check_range("gates.target_latency_ms", self.target_latency_ms, low=0.0, low_open=True, optional=True)
        check_range("gates.budget_lr", self.budget_lr, low=0.0, low_open=True)
        if self.target_macs is not None and self.target_latency_ms is not None:
            raise ConfigError(f"gates.target_latency_ms: {self.target_latency_ms} and gates.target_macs="
                              f"{self.target_macs} are two budgets; set one of them")
        if self.budgeted:
            key = "target_macs" if self.target_macs is not None else "target_latency_ms"
            value = self.target_macs if self.target_macs is not None else self.target_latency_ms
            if self.lam not in (None, 0.0):
                raise ConfigError(f"gates.lam: {self.lam} contradicts gates.{key}={value} (with a "
                                  "budget training adjusts λ itself); set one of them")
            if self.schedule != "constant":
                raise ConfigError(f"gates.schedule: {self.schedule} is a λ schedule and contradicts gates.{key} "
                                  "(the budget ramps over gates.warmup_epochs and gates.ramp_epochs)")
        if self.importance == "fisher" and not self.budgeted:
            raise ConfigError("gates.importance: fisher ranks channels for a budget; set gates.target_macs or "
                              "gates.target_latency_ms")
        if self.importance == "fisher" and self.resolved_kind != "ste":
            raise ConfigError(f"gates.importance: fisher needs straight-through gates (gates.kind=ste), not "
                              f"gates.kind={self.resolved_kind}")
        check_range("gates.warmup_epochs", self.warmup_epochs, low=0.0, optional=True)
        check_range("gates.stages", self.stages, low=1)
        check_range("gates.ramp_epochs", self.ramp_epochs, low=0.0, low_open=True, optional=True)
        check_range("gates.init", self.init, low=0.5, high=1.0, low_open=True, high_open=True)
        check_range("gates.temperature", self.temperature, low=0.0, low_open=True)
        check_range(
            "gates.temperature_final", self.temperature_final, low=0.0, low_open=True, optional=True
        )
        check_range("gates.lr", self.lr, low=0.0, low_open=True)

    @property
    def resolved_importance(self) -> str:
        """``importance``, with None decided: fisher for budgeted straight-through gates, else gradient."""
        if self.importance is not None:
            return self.importance
        return "fisher" if self.budgeted and self.resolved_kind == "ste" else "gradient"

    @property
    def resolved_kind(self) -> GateKind:
        """``kind``, with None decided: straight-through gates with a budget, sigmoid gates in λ mode."""
        if self.kind is not None:
            return self.kind
        return "ste" if self.budgeted else "sigmoid"

    @property
    def budgeted(self) -> bool:
        """Training meets a budget (MACs or latency) rather than weighing a penalty by λ."""
        return self.target_macs is not None or self.target_latency_ms is not None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    label_smoothing: float = 0.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # bf16 autocast and channels_last; None: on for CUDA, off on CPU.
    amp: Optional[bool] = None
    channels_last: Optional[bool] = None
    grad_clip: Optional[float] = None
    checkpoint_every: int = 1  # epochs between checkpoints written by `prunevision train`

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, low=1)
        check_range("train.lr", self.lr, low=0.0, low_open=True)
        check_range("train.momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_range("train.weight_decay", self.weight_decay, low=0.0)
        check_range("train.label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        check_range("train.grad_clip", self.grad_clip, low=0.0, low_open=True, optional=True)
        check_range("train.checkpoint_every", self.checkpoint_every, low=1)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class PruneConfig:
    method: PruneMethod = "gate"
    # τ: sigmoid gates under it count as closed (None: 0.5). Hard gates (ste, hard_concrete) are
    # exactly open or closed: no τ to choose, and setting one is an error.
    threshold: Optional[float] = None
    steps: int = 1  # iterative pruning steps (1 = one-shot)
    # baselines: share of channels (structured) or weights (unstructured) to remove in all
    target_sparsity: Optional[float] = None
    # kept widths rounded up to a multiple: ONNX Runtime's CPU kernels want multiples of 8
    # (benchmarks/RESULTS.md: mobilenet_v2 at 75 % removed ran 1.2x faster unrounded, 4.3x rounded)
    round_to: Optional[int] = 8
    min_channels: int = 1  # no layer is ever left narrower than this
    max_layer_sparsity: Optional[float] = None  # per-layer cap on the share of channels removed
    finetune_epochs: int = 1  # after pruning, and (iterative) between steps
    finetune_lr: float = 0.01
    # distillation while fine-tuning: weight α of T²·KL(dense ‖ pruned) on outputs softened by
    # distill_temperature, (1 − α) on the labels; 0 = off
    distill: float = 0.0
    distill_temperature: float = 4.0
    calibration_batches: int = 8  # taylor, ocap, lrp: batches (of data.classes when set) that rank channels
    skip_first: int = 0  # leave the first N conv layers (in forward order) unpruned
    # baselines: several pruning ratios from the one trained model, each its own pruned model and
    # metrics row (in ratios/), besides target_sparsity
    ratios: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        check_range("prune.threshold", self.threshold, low=0.0, high=1.0, low_open=True, high_open=True,
                     optional=True)
        check_range("prune.steps", self.steps, low=1)
        check_range(
            "prune.target_sparsity", self.target_sparsity, low=0.0, high=1.0, high_open=True, optional=True
        )
        check_range("prune.round_to", self.round_to, low=1, optional=True)
        check_range("prune.min_channels", self.min_channels, low=1)
        check_range("prune.max_layer_sparsity", self.max_layer_sparsity, low=0.0, high=1.0, low_open=True,
                     high_open=True, optional=True)
        check_range("prune.finetune_epochs", self.finetune_epochs, low=0)
        check_range("prune.finetune_lr", self.finetune_lr, low=0.0, low_open=True)
        check_range("prune.distill", self.distill, low=0.0, high=1.0)
        check_range("prune.distill_temperature", self.distill_temperature, low=0.0, low_open=True)
        check_range("prune.calibration_batches", self.calibration_batches, low=1)
        check_range("prune.skip_first", self.skip_first, low=0)
        if self.ratios is not None:
            if self.method == "gate":
                raise ConfigError("prune.ratios: for the baseline methods (gate pruning follows the gates; sweep "
                                  "gates.target_macs instead)")
            for r in self.ratios:
                check_range("prune.ratios", r, low=0.0, high=1.0, low_open=True, high_open=True)


@dataclass(frozen=True)
class MeasureConfig:
    enabled: bool = True  # prune, measure and export after training
    latency: bool = True
    batch: int = 64  # the larger batch measured besides batch 1
    runs: int = 30
    warmup: int = 10
    threads: int = 1  # ONNX Runtime and PyTorch CPU threads while timing (recorded)
    torch_latency: bool = True  # PyTorch eager on the training device as well
    export: bool = True  # write model.onnx and dense.onnx
    exporter: Literal["dynamo", "torchscript"] = "dynamo"

    def __post_init__(self) -> None:
        check_range("measure.batch", self.batch, low=1)
        check_range("measure.runs", self.runs, low=30)
        check_range("measure.warmup", self.warmup, low=0)
        check_range("measure.threads", self.threads, low=1)
        if self.latency and not self.export:
            raise ConfigError("measure.latency: ONNX Runtime latency needs measure.export=true")


MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        # derived seeds (seed·100003 + epoch, ...) must stay inside the generators' 64-bit range
        check_range("seed", self.seed, low=0, high=MAX_SEED)
        if self.gates.resolved_kind != "sigmoid" and self.prune.threshold is not None:
            raise ConfigError(f"prune.threshold: gates.kind={self.gates.resolved_kind} gates are exactly open or "
                              "closed; τ is only for gates.kind=sigmoid")
        p = self.prune
        if p.method != "gate" and self.gates.target_latency_ms is not None:
            raise ConfigError(f"gates.target_latency_ms: a latency budget is met by the gates (prune.method=gate), "
                              f"not by prune.method={p.method}; use gates.target_macs or prune.target_sparsity")
        if p.method != "gate" and p.target_sparsity is None and self.gates.target_macs is None:
            raise ConfigError(f"prune.target_sparsity: required for prune.method={p.method} (or a MACs budget, "
                              "gates.target_macs)")

    @property
    def tau(self) -> float:
        """The threshold under which a gate counts as closed."""
        if self.gates.resolved_kind != "sigmoid":
            return HARD_GATE_THRESHOLD
        return self.prune.threshold if self.prune.threshold is not None else 0.5

    @property
    def budget(self) -> float | None:
        """gates.target_macs when training is budgeted (gate pruning only)."""
        return self.gates.target_macs if self.prune.method == "gate" else None

    @property
    def latency_budget(self) -> float | None:
        """gates.target_latency_ms when training is budgeted by latency (gate pruning only)."""
        return self.gates.target_latency_ms if self.prune.method == "gate" else None

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``gates.lam`` → value), e.g. for MLflow params."""
        return flatten(self.to_dict())

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """A copy with dotted-key overrides applied and validated."""
        return from_dict(self.to_dict(), overrides=dotted)


# --------------------------------------------------------------------------- building


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides."""
    data = read_yaml_mapping(path, "config file") if path is not None else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return from_dict(data, overrides=overrides or {})


MAX_YAML_VALUES = 100_000  # what a config or sweep file may expand to, aliases included


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the later one would win
    silently) and a document whose aliases expand past MAX_YAML_VALUES values (a 'billion laughs'
    file is a few hundred bytes and expands to billions)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (line {seen[key] + 1} and line "
                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: SafeLoader says so itself
                pass
        return super().construct_mapping(node, deep=deep)


def _expanded_size(obj: Any, limit: int) -> int:
    """How many values ``obj`` holds once its shared parts (YAML aliases) are counted each time they
    appear; stops counting past ``limit``."""
    count, stack = 0, [obj]
    while stack and count <= limit:
        o = stack.pop()
        count += 1
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return count


def read_yaml_mapping(path: str | Path, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A YAML file that holds a mapping (empty file: empty mapping); problems as one-line errors."""
    p = require_file(path, what, error, kind="a YAML file")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506  (safe + strict)
    except yaml.YAMLError as e:
        raise error(f"{what} {p} is not valid YAML: {_one_line(e)}") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {p} is not UTF-8 text (byte {e.start}): not a YAML file?") from None
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply to be a config") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise error(f"{what} {p} must hold a mapping at the top level")
    if _expanded_size(loaded, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise error(f"{what} {p} expands to more than {MAX_YAML_VALUES} values (YAML aliases): not a config")
    return loaded


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def from_dict(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    merged = _deep_copy(data)
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value)
    cfg = build_section(ExperimentConfig, merged, prefix="")
    if cfg.prune.method != "gate" and (cfg.gates.lam != 0 or cfg.gates.resolved_kind != "sigmoid"
                                       or cfg.gates.importance not in (None, "gradient")):
        # Baselines prune the plainly trained network: the gate penalty exists for gate pruning,
        # and under it a baseline would start from a network already squeezed by the gates. Their
        # gates are soft (hard straight-through gates would close channels even without a penalty).
        cfg = dataclasses.replace(cfg, gates=dataclasses.replace(cfg.gates, lam=0.0, kind="sigmoid",
                                                                 importance=None))
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    from prunevision.fsutil import atomic_write

    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- internals


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """A frozen dataclass from a mapping the user wrote: unknown keys (with a "did you mean"), wrong
    types and shapes, non-finite numbers and the class's own range checks, each as one ConfigError
    line naming the dotted key. The one validator behind configs and sweep files."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}{key}"
            candidates = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(full, candidates, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_section(tp, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(key, data[f.name], tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix.rstrip('.')}: {_one_line(e)}") from None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        for a in inner:  # pragma: no cover - no such fields today
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} has the wrong type")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value != value:  # NaN
            raise ConfigError(f"{key}: NaN is not allowed")
        if not math.isfinite(value):  # no setting means "unbounded" by .inf
            raise ConfigError(f"{key}: {value} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def check_range(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    if value is None:
        if optional:
            return
        raise ConfigError(f"{key}: a value is required")
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ConfigError(f"{key}: {value} is out of range {rng}")


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _to_plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())

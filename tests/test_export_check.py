"""The ONNX check scales with the output: right exports with huge logits pass, wrong exports
with tiny logits fail (real ONNX Runtime)."""

import pytest
import torch
from torch import nn

from prunevision.export import ExportError, compare_outputs, export_onnx


def tiny(scale: float) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 10))
    with torch.no_grad():
        m[4].weight.mul_(scale)
        m[4].bias.mul_(scale)
    return m.eval()


def test_correct_export_with_huge_logits_passes(tmp_path):
    m = tiny(4e5)  # logits around 1e4–1e5, as an untrained mnasnet0_5 with closed gates gives
    r = export_onnx(m, tmp_path / "m.onnx", 16, exporter="torchscript")
    assert (tmp_path / "m.onnx").is_file()
    assert r["max_rel_diff"] < 1e-5 and r["top1_agreement"] == 1.0 and r["top1_checked"] > 0


def test_wrong_export_with_tiny_logits_fails(tmp_path):
    export_onnx(tiny(1e-5), tmp_path / "m.onnx", 16, exporter="torchscript")
    other = tiny(1e-5)
    with torch.no_grad():
        other[4].weight.copy_(torch.randn_like(other[4].weight) * 1e-5)  # another network, same scale
    x = [torch.randn(8, 3, 16, 16)]
    with pytest.raises(ExportError, match="differs"):
        compare_outputs(other, tmp_path / "m.onnx", x)

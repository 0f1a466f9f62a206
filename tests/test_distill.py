"""Distillation while fine-tuning: KL to the dense network's softened outputs."""

import copy

import pytest
import torch
from torch import nn

from prunevision.config import load_config
from prunevision.data import load_dataset
from prunevision.models import build_gated_model
from prunevision.train import distill_loss, fit


def test_distill_loss_is_zero_against_itself_and_positive_against_another_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(8, 3, 2, 2)
    out = net(x)
    task = torch.tensor(1.7)
    assert float(distill_loss(task, out.detach(), net, x, 1.0, 4.0, False)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(task, out, net, x, 0.0, 4.0, False)) == pytest.approx(1.7)
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[1].weight.mul_(-1)
    assert float(distill_loss(task, out, other, x, 1.0, 4.0, False)) > 0.01


def test_fine_tuning_pulls_the_student_towards_the_teacher():
    cfg = load_config(None, {"data.name": "synthetic", "data.synthetic_train": 128, "data.synthetic_test": 64,
                             "data.num_classes": 4, "data.batch_size": 32, "data.image_size": 16,
                             "model.name": "small_cnn", "train.epochs": 2, "gates.lam": 0.0, "prune.distill": 1.0,
                             "prune.distill_temperature": 2.0})
    torch.manual_seed(0)
    data = load_dataset(cfg.data, seed=0)
    teacher = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size).eval()
    student = build_gated_model(cfg.model, cfg.gates, data.num_classes, data.image_size)
    x = ((data.test_x[:64].float() / 255 - torch.tensor(data.mean).view(1, 3, 1, 1))
         / torch.tensor(data.std).view(1, 3, 1, 1))

    def gap():
        student.eval()
        with torch.no_grad():
            return float((student(x).softmax(1) - teacher(x).softmax(1)).abs().mean())

    before = gap()
    fit(student, data, cfg, teacher=teacher)
    assert gap() < before

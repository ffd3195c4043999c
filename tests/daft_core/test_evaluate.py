"""Tests for daft_core.evaluate: metrics against hand-computed values, distortion, mode restoration."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from daft_core.evaluate import evaluate, expected_calibration_error, parameter_distance
from daft_core.models import build_model


@dataclass
class _Set:
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


# Hand-made probabilities: confidences 0.95, 0.95, 0.75, 0.55; predictions 0, 0, 1, 0; labels 0, 1, 1, 0.
PROBS = torch.tensor(
    [[0.95, 0.03, 0.02], [0.95, 0.03, 0.02], [0.15, 0.75, 0.10], [0.55, 0.25, 0.20]], dtype=torch.float64
)
LABELS = torch.tensor([0, 1, 1, 0])
# n_bins=10: bin (0.9,1]: 2 samples, acc 0.5, conf 0.95; (0.7,0.8]: 1, acc 1, conf 0.75;
# (0.5,0.6]: 1, acc 1, conf 0.55
ECE_10 = 2 / 4 * 0.45 + 1 / 4 * 0.25 + 1 / 4 * 0.45
NLL = -(math.log(0.95) + math.log(0.03) + math.log(0.75) + math.log(0.55)) / 4


class FixedLogits(nn.Module):
    """Returns a stored logit row per sample; the sample index is encoded in the image's pixels."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits.float())
        c = logits.shape[1]
        self.head = nn.Linear(c, c)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(c))
            self.head.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


def _index_images(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()


def _naive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            acc = (pred[mask] == labels[mask]).double().mean()
            total += float(mask.double().mean() * (acc - conf[mask].mean()).abs())
    return total


def test_expected_calibration_error_by_hand() -> None:
    assert expected_calibration_error(PROBS, LABELS, n_bins=10) == pytest.approx(ECE_10)
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 7, generator=g).mul(3).softmax(1)
    labels = torch.randint(0, 7, (500,), generator=g)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(
            _naive_ece(probs, labels, n_bins)
        )
    perfect = torch.eye(3)
    assert expected_calibration_error(perfect, torch.arange(3)) == 0.0


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_metrics_from_fixed_logits(batch_size: int) -> None:
    model = FixedLogits(PROBS.log())
    ds = _Set(_index_images(4), LABELS.clone(), ["cat", "dog", "bird"])
    r = evaluate(model, {"id_test": ds}, batch_size=batch_size, n_bins=10)["sets"]["id_test"]
    assert r["n"] == 4
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["ece"] == pytest.approx(ECE_10)
    assert r["nll"] == pytest.approx(NLL, rel=1e-6)
    assert r["per_class_accuracy"] == {"cat": 1.0, "dog": 0.5, "bird": None}
    assert "feature_distortion" not in r


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_confusion_matrix_rows_true_columns_predicted(batch_size: int) -> None:
    model = FixedLogits(PROBS.log())  # predictions 0, 0, 1, 0 for labels 0, 1, 1, 0
    ds = _Set(_index_images(4), LABELS.clone(), ["cat", "dog", "bird"])
    r = evaluate(model, {"id_test": ds, "ood": ds}, batch_size=batch_size)["sets"]
    assert r["id_test"]["confusion_matrix"] == {
        "classes": ["cat", "dog", "bird"],
        "matrix": [[2, 0, 0], [1, 1, 0], [0, 0, 0]],
    }
    assert r["ood"]["confusion_matrix"] == r["id_test"]["confusion_matrix"]
    # consistent with the other per-set numbers, on a real model too
    torch.manual_seed(0)
    tiny = build_model("tiny_cnn", num_classes=3, input_size=16, width=4)
    g = torch.Generator().manual_seed(2)
    data = _Set(
        torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8, generator=g),
        torch.randint(0, 3, (37,), generator=g),
        ["a", "b", "c"],
    )
    out = evaluate(tiny, {"id_test": data}, batch_size=batch_size)["sets"]["id_test"]
    assert out["confusion_matrix"]["classes"] == ["a", "b", "c"]
    cm = torch.tensor(out["confusion_matrix"]["matrix"])
    assert cm.dtype == torch.int64 and cm.shape == (3, 3) and int(cm.sum()) == 37
    assert cm.sum(1).tolist() == torch.bincount(data.labels, minlength=3).tolist()
    assert float(cm.diag().sum()) / 37 == pytest.approx(out["accuracy"])
    with torch.no_grad():
        pred = tiny.eval()(data.images).argmax(1)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(data.labels.tolist(), pred.tolist(), strict=True):
        expected[t, p] += 1
    assert torch.equal(cm, expected)


def test_validation_errors() -> None:
    model = FixedLogits(PROBS.log())
    empty = _Set(
        torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), ["a", "b", "c"]
    )
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, {"ood": empty})
    bad = _Set(_index_images(4), torch.tensor([0, 1, 3, 0]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="outside the model head"):
        evaluate(model, {"ood": bad})
    with pytest.raises(ValueError):
        evaluate(model, {})


@pytest.fixture
def tiny_and_data():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=3, input_size=16, width=4)
    g = torch.Generator().manual_seed(1)
    ds = _Set(
        torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=g),
        torch.randint(0, 3, (10,), generator=g),
        ["a", "b", "c"],
    )
    return model, ds


def test_distortion_against_itself_and_after_perturbation(tiny_and_data) -> None:
    model, ds = tiny_and_data
    out = evaluate(model, {"id_test": ds, "ood": ds}, reference=model, batch_size=4)
    for r in out["sets"].values():
        fd = r["feature_distortion"]
        assert fd["l2_mean"] == 0.0 and fd["l2_median"] == 0.0 and fd["relative_l2_mean"] == 0.0
        assert fd["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert out["parameter_distance"]["total"]["l2"] == 0.0
    assert all(m["l2"] == 0.0 for m in out["parameter_distance"]["per_module"].values())

    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.backbone.body[0].weight.add_(0.5)
    moved.replace_head(5)  # different head shape: skipped in the parameter distance
    out = evaluate(moved, {"id_test": ds}, reference=model, batch_size=4)
    fd = out["sets"]["id_test"]["feature_distortion"]
    assert fd["l2_mean"] > 0 and fd["l2_median"] > 0 and fd["relative_l2_mean"] > 0
    assert fd["cosine_mean"] < 1.0
    pd = out["parameter_distance"]
    assert pd["per_module"]["backbone.body.0"]["l2"] > 0
    assert pd["per_tensor"]["backbone.body.0.weight"]["relative"] > 0
    changed = {k for k, v in pd["per_module"].items() if v["l2"] > 0}
    assert changed == {"backbone.body.0"}
    assert pd["skipped"] == ["head.bias", "head.weight"] and pd["head"] is None  # no comparable head
    assert pd == parameter_distance(moved, model)


def test_modes_restored_and_eval_mode_used(tiny_and_data) -> None:
    model, ds = tiny_and_data
    reference = copy.deepcopy(model)
    model.train()
    model.backbone.body[1].eval()  # mixed modes (e.g. BN frozen) must survive
    reference.train()
    seen: list[bool] = []
    hook = model.backbone.body[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    bn_stats = model.backbone.body[1].running_mean.clone()
    try:
        evaluate(model, {"id_val": ds}, reference=reference, batch_size=5)
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert model.training and not model.backbone.body[1].training and model.backbone.training
    assert reference.training and all(m.training for m in reference.modules())
    assert torch.equal(model.backbone.body[1].running_mean, bn_stats)  # eval mode: BN stats untouched


def test_parameter_distance_total_is_the_backbone_and_the_head_is_separate(tiny_and_data) -> None:
    """An LP-like model (backbone untouched, head refit) has total 0 and a positive head distance."""
    model, _ = tiny_and_data
    probe = copy.deepcopy(model)
    with torch.no_grad():
        probe.head.weight.add_(3.0)
        probe.head.bias.sub_(1.0)
    pd = parameter_distance(probe, model)
    assert pd["total"]["l2"] == 0.0 and pd["total"]["relative"] == 0.0
    n_head = probe.head.weight.numel() + probe.head.bias.numel()
    assert pd["total"]["num_params"] == sum(p.numel() for p in probe.parameters()) - n_head
    head_l2 = math.sqrt(3.0**2 * probe.head.weight.numel() + 1.0 * probe.head.bias.numel())
    assert pd["head"]["l2"] == pytest.approx(head_l2) and pd["head"]["num_params"] == n_head
    assert pd["head"]["relative"] > 0

    with torch.no_grad():  # a backbone change shows in total, not in head
        probe.backbone.body[0].weight.add_(0.5)
    moved = parameter_distance(probe, model)
    assert moved["total"]["l2"] == pytest.approx(0.5 * math.sqrt(probe.backbone.body[0].weight.numel()))
    assert moved["head"] == pd["head"]

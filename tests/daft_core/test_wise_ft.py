"""Tests for daft_core.wise_ft: the interpolation's end points and buffers, the α selection, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daft_core.models import build_model
from daft_core.wise_ft import DEFAULT_ALPHAS, interpolate, select_alpha, start_model


def _tiny(seed: int, num_classes: int = 3, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny_cnn", num_classes=num_classes, input_size=16, width=width)
    with torch.no_grad():  # distinct BN statistics, so buffers visibly mix
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(seed + 1)
    return model.eval()


def _images(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_default_grid_is_zero_to_one_in_tenths() -> None:
    assert DEFAULT_ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_end_points_reproduce_the_two_models_exactly() -> None:
    start, ft = _tiny(0), _tiny(1)
    x = _images()
    with torch.no_grad():
        want_start, want_ft = start(x), ft(x)
        assert not torch.allclose(want_start, want_ft)
        assert torch.equal(interpolate(start, ft, 0.0).eval()(x), want_start)
        assert torch.equal(interpolate(start, ft, 1.0).eval()(x), want_ft)


def test_every_float_tensor_mixes_buffers_included_and_inputs_untouched() -> None:
    start, ft = _tiny(0), _tiny(1)
    before_s, before_f = _state(start), _state(ft)
    mixed = interpolate(start, ft, 0.25)
    assert mixed is not ft and mixed.spec == ft.spec
    state = mixed.state_dict()
    bn_keys = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert bn_keys
    for k, v in state.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * before_s[k] + 0.25 * before_f[k])
        else:  # num_batches_tracked: the fine-tuned model's
            assert torch.equal(v, before_f[k]) and not torch.equal(v, before_s[k])
    for k in before_s:
        assert torch.equal(start.state_dict()[k], before_s[k])
        assert torch.equal(ft.state_dict()[k], before_f[k])


class _Linear2(nn.Module):
    """logits = W x: a model whose val accuracy as a function of α is known in closed form."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


# W(α) = [[1-α, α], [α, 1-α]]: logit difference (1 - 2α)(x0 - x1), so α < 0.5 predicts argmax(x), α > 0.5
# argmin(x), α = 0.5 ties every row (predicts class 0).
START, FLIPPED = _Linear2([[1, 0], [0, 1]]), _Linear2([[0, 1], [1, 0]])
X = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.5]])


def test_selection_picks_the_best_val_alpha() -> None:
    labels = X.argmin(dim=1)  # only the fine-tuned side (α > 0.5) is right
    r = select_alpha(START, FLIPPED, X, labels, alphas=[1.0, 0.2, 0.6, 0.6, 0.0], batch_size=3, device="cpu")
    assert [p["alpha"] for p in r.curve] == [0.0, 0.2, 0.6, 1.0]  # sorted, duplicates dropped
    assert [p["val_accuracy"] for p in r.curve] == [0.0, 0.0, 1.0, 1.0]
    assert r.alpha == 0.6  # tied with 1.0: the smaller α, closer to the start
    torch.testing.assert_close(r.model.fc.weight, torch.tensor([[0.4, 0.6], [0.6, 0.4]]))
    assert r.to_dict() == {"alpha": 0.6, "curve": r.curve}


def test_selection_ties_go_to_the_smaller_alpha() -> None:
    labels = X.argmax(dim=1)  # every α < 0.5 is perfect
    r = select_alpha(START, FLIPPED, X, labels, device="cpu")
    assert r.alpha == 0.0 and [p["alpha"] for p in r.curve] == list(DEFAULT_ALPHAS)
    assert [p["val_accuracy"] for p in r.curve[:5]] == [1.0] * 5 and r.curve[-1]["val_accuracy"] == 0.0
    assert torch.equal(r.model.fc.weight, START.fc.weight)
    assert torch.equal(FLIPPED.fc.weight, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # inputs untouched


def test_mismatched_models_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"tensor 'head.weight' differs.*start \(3, \d+\).*fine-tuned \(5, "):
        interpolate(_tiny(0, num_classes=3), _tiny(1, num_classes=5), 0.5)
    with pytest.raises(ValueError, match="same architecture"):
        interpolate(START, _tiny(1), 0.5)
    with pytest.raises(ValueError, match="same architecture"):
        select_alpha(START, _tiny(1), _images(), torch.zeros(6, dtype=torch.long), device="cpu")


@pytest.mark.parametrize("alphas", [[], [1.5], [-0.1, 0.5], [float("nan")]])
def test_alphas_outside_the_unit_interval_are_refused(alphas: list[float]) -> None:
    with pytest.raises(ValueError, match="alphas"):
        select_alpha(START, FLIPPED, X, X.argmax(dim=1), alphas=alphas, device="cpu")


def test_start_model_has_the_head_the_run_began_from() -> None:
    start, other = _tiny(0), _tiny(1)
    before = _state(start)
    for init in ("zero", "random"):
        m = start_model(start, init)
        assert not m.head.weight.any() and not m.head.bias.any()
        assert torch.equal(m.backbone.body[0].weight, start.backbone.body[0].weight)
    assert torch.equal(start_model(start, "probe").head.weight, start.head.weight)  # the probe's own model
    assert torch.equal(start_model(start, "probe", other.head).head.bias, other.head.bias)
    assert all(torch.equal(v, before[k]) for k, v in start.state_dict().items())  # input untouched
    with pytest.raises(ValueError, match="unknown head_init 'lp'"):
        start_model(start, "lp")

"""torch.compile on CPU: the training step traces as one graph, and a compiled run trains like eager.

Inductor needs a C++ compiler; without one these tests fall back to the ``aot_eager`` backend (same
Dynamo tracing and AOTAutograd backward, no C++ code generation).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from daft_core.methods import get_recipe
from daft_core.models import build_model
from daft_core.training import FinetuneConfig, finetune, make_step_context, train_step
from daft_core.training import step as step_module


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return False
    return True


BACKEND = "inductor" if _has_cpp_compiler() else "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class _EagerOptimizer:
    """Stands in for the optimizer: its zero_grad/step run eagerly in the loop (Dynamo deliberately
    skips ``Optimizer.zero_grad``), so the explained graph is the rest of the real `train_step`."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_train_step_has_no_graph_breaks(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, weights=None, num_classes=10, input_size=32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # channels_last "on": what params.yaml runs on CPU too.
    config = FinetuneConfig(device="cpu", channels_last="on", label_smoothing=0.1)
    ctx = make_step_context(model, optimizer, config, torch.device("cpu"))
    ctx = dataclasses.replace(ctx, optimizer=_EagerOptimizer())
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4) % 10

    # trace_autograd_ops: Dynamo follows loss.backward() too, so forward + loss + backward is checked.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(train_step)(ctx, x, y)

    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
    assert model.head.weight.grad is not None  # the explained call really ran the backward


def _spy_compile(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record torch.compile's arguments; use aot_eager where inductor cannot build C++ kernels."""
    calls: list[dict[str, Any]] = []
    real = torch.compile

    def spy(module: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(module, **kwargs) if BACKEND == "inductor" else real(module, backend=BACKEND)

    monkeypatch.setattr(torch, "compile", spy)
    if BACKEND != "inductor":
        monkeypatch.setattr(step_module, "_check_cpu_compiler", lambda: None)
    return calls


def test_compiled_cpu_run_matches_eager(monkeypatch, pretrained, data) -> None:
    train, val = data
    recipe = get_recipe("ft")
    base = {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "seed": 0, "device": "cpu"}
    eager = finetune(copy.deepcopy(pretrained), train, val, recipe, FinetuneConfig(**base))
    calls = _spy_compile(monkeypatch)
    compiled = finetune(copy.deepcopy(pretrained), train, val, recipe, FinetuneConfig(**base, compile=True))

    assert calls == [{"mode": None}]  # "reduce-overhead" (CUDA graphs) is dropped on CPU
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo really compiled the model
    e, c = eager.history[0], compiled.history[0]
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4, abs=1e-6)
    assert c["val_accuracy"] == pytest.approx(e["val_accuracy"], abs=1e-6)
    after = compiled.model.state_dict()
    for k, v_e in eager.model.state_dict().items():
        torch.testing.assert_close(after[k], v_e, rtol=1e-4, atol=1e-5, msg=k)


def test_cpu_compile_without_compiler_is_one_clear_error(monkeypatch) -> None:
    import torch._inductor.cpp_builder as cpp_builder

    def missing() -> str:
        raise RuntimeError("no working C++ compiler found in ('g++',)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    model = build_model("tiny_cnn", weights=None, num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = FinetuneConfig(device="cpu", compile=True)
    with pytest.raises(ValueError, match=r"C\+\+ compiler.*compile to false"):
        make_step_context(model, optimizer, config, torch.device("cpu"))


def test_compile_off_leaves_the_module_eager() -> None:
    model = build_model("tiny_cnn", weights=None, num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = make_step_context(model, optimizer, FinetuneConfig(device="cpu"), torch.device("cpu"))
    assert ctx.module is model and not ctx.compiled_cudagraphs

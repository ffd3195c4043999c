"""benchmarks.bn_stats: the timing run and the kernel-floor table are well-formed (no speed asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from benchmarks.bn_stats import main
from daft_core.models import build_model


def test_kernel_floor_times_every_bn_input(tmp_path: Path) -> None:
    out = tmp_path / "bn.json"
    main(
        [
            *("--model", "tiny_cnn", "--weights", "none", "--input-size", "16", "--data", str(tmp_path)),
            *("--max-batches", "2", "--repeats", "1", "--threads", "1", "--kernels", "--out", str(out)),
        ]
    )
    result = json.loads(out.read_text())
    bn_layers = sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        for m in build_model("tiny_cnn", weights=None, num_classes=10, input_size=16).modules()
    )
    assert set(result["results"]) == set(result["kernel_floor"]) == {"contiguous", "channels_last"}
    for layout, floor in result["kernel_floor"].items():
        assert floor["bn_layers"] == bn_layers > 0, layout
        assert floor["forward_cpu_ms"] > 0
        for name, k in floor["kernels"].items():
            assert k["cpu_ms"] >= 0 and k["ratio_bound"] >= 1.0, (layout, name)
        r = result["results"][layout]
        assert r["convert_over_plain"] == r["convert_over_plain_cpu"] > 0

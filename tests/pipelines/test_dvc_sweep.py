"""`python -m pipelines.dvc_sweep`: the catalogue's grid as DVC experiments, published points only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daft_core.methods import METHODS
from pipelines.dvc_sweep import exp_commands, main

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _sets(argv: list[str]) -> dict[str, float]:
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    return {k.rsplit(".", 1)[1]: float(v) for k, v in (p.split("=", 1) for p in pairs)}


def test_one_queued_experiment_per_catalogue_point() -> None:
    for method in ("ft", "daft"):
        commands = exp_commands(method, str(PARAMS))
        assert all(c[:4] == ["dvc", "exp", "run", "--queue"] for c in commands)
        points = [_sets(c) for c in commands]
        if METHODS[method].sweep == "lr":
            assert [p["lr"] for p in points] == METHODS[method].lr_list()
        else:
            assert [(p["head_lr"], p["backbone_lr"]) for p in points] == list(METHODS[method].grid)


def test_unpublished_points_and_missing_branches_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match=r"much faster.*variant"):
        exp_commands("daft", str(PARAMS), grid="0.01:0.01")
    assert main(["daft", "--params", str(PARAMS), "--grid", "0.01:0.01"]) == 2
    assert capsys.readouterr().err.startswith("error:")
    with pytest.raises(ValueError, match="no branch"):
        exp_commands("daft_bn_only", str(PARAMS))
    # Named as a variant, the same point is accepted.
    tree = yaml.safe_load(PARAMS.read_text())
    tree["finetune"]["methods"]["daft"]["variant"] = "equal-lrs"
    named = tmp_path / "params.yaml"
    named.write_text(yaml.safe_dump(tree))
    (cmd,) = exp_commands("daft", str(named), grid="0.01:0.01")
    assert _sets(cmd) == {"head_lr": 0.01, "backbone_lr": 0.01}

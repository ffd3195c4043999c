"""Params checks before work: epochs >= 1, finite floats, strict ints/bools, no empty params file, no YAML
alias bombs, bounded error messages; each a ParamsError naming the file/key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.params import (
    MAX_ECHO_CHARS,
    MAX_PARAMS_BYTES,
    DataParams,
    ParamsError,
    load_params,
    params_from_dict,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


def refused(override: dict) -> str:
    with pytest.raises(ParamsError) as err:
        load_params(PARAMS, override)
    return str(err.value)


@pytest.mark.parametrize("key", ["finetune.epochs", "finetune.methods.ft.epochs"])
def test_zero_epochs_is_refused(key: str) -> None:
    msg = refused({key: 0})
    assert key in msg and "greater than or equal to 1" in msg


@pytest.mark.parametrize(
    "key",
    [
        "finetune.methods.ft.lr",
        "finetune.methods.daft.head_lr",
        "finetune.methods.daft.backbone_lr",
        "finetune.momentum",
        "finetune.weight_decay",
        "data.val_fraction",
        "data.test_fraction",
        "linear_probe.c_min",
        "linear_probe.c_max",
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_floats_are_refused(key: str, value: float) -> None:
    msg = refused({key: value})
    assert key in msg and "finite" in msg


def test_non_finite_scale_and_yaml_spellings(tmp_path: Path) -> None:
    assert "finetune.augment.scale.1" in refused({"finetune.augment.scale": [0.5, float("nan")]})
    text = PARAMS.read_text().replace("lr: 0.1}", "lr: .inf}")  # ft's lr, written the YAML way
    assert "lr: .inf}" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"finetune\.methods\.ft\.lr: Input should be a finite number"):
        load_params(tmp_path / "params.yaml")
    # a YAML float without a dot (read as a string by PyYAML) still parses
    assert load_params(PARAMS, parse_overrides(["finetune.methods.ft.lr=1e-3"])).recipe("ft").head_lr == 0.001


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("finetune.epochs", True),  # was read as 1
        ("finetune.methods.ft.epochs", True),
        ("data.seed", False),
        ("finetune.batch_size", 64.0),
        ("finetune.epochs", "3"),
        ("finetune.methods.ft.lr", True),  # was read as 1.0
        ("finetune.compile", "yes"),
        ("pipeline.tracking", 1),
        ("finetune.augment.hflip", 0),
        ("data.follow_symlinks", "true"),
    ],
)
def test_ints_and_bools_are_strict(key: str, value: object) -> None:
    assert key in refused({key: value})


def test_bare_on_off_still_accepted_for_channels_last() -> None:
    for value, expected in ((True, "on"), (False, "off"), ("auto", "auto")):
        assert load_params(PARAMS, {"finetune.channels_last": value}).finetune.channels_last == expected


def test_new_data_params() -> None:
    assert (DataParams().follow_symlinks, DataParams().max_pixels) == (False, 40_000_000)
    d = load_params(PARAMS).data
    assert (d.follow_symlinks, d.max_pixels) == (False, 40_000_000)  # listed in params.yaml
    assert "data.max_pixels" in refused({"data.max_pixels": 0})


@pytest.mark.parametrize("text", ["", "\n\n", "# all commented out\n# data:\n#   seed: 1\n", "{}\n"])
def test_an_empty_params_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert str(path) in msg and "empty" in msg and "mapping of sections" in msg and "\n" not in msg


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(["pipeline:", "  experiment: *a9", *lines]) + "\n")
    start = time.perf_counter()
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert time.perf_counter() - start < 2
    msg = str(err.value)
    assert "alias" in msg and str(path) in msg and len(msg) < 1000 and "\n" not in msg
    with pytest.raises(ParamsError, match="alias"):
        parse_overrides(["pipeline.experiment=*a"])


def test_an_oversized_params_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("# padding\n" * (MAX_PARAMS_BYTES // 10 + 1))
    with pytest.raises(ParamsError, match="limit") as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_echoed_values_and_error_lists_are_capped() -> None:
    with pytest.raises(ParamsError) as err:
        params_from_dict({"finetune": {"epochs": "x" * 100_000}})
    msg = str(err.value)
    assert "finetune.epochs" in msg and len(msg) < 3 * MAX_ECHO_CHARS + 200
    with pytest.raises(ParamsError) as err:
        params_from_dict({"data": {f"typo{i}": 1 for i in range(500)}})
    msg = str(err.value)
    assert "data.typo0" in msg and "more errors" in msg and len(msg) < 5000 and "\n" not in msg
    with pytest.raises(ParamsError) as err:
        params_from_dict({"data": {"ood": list(range(100_000))}})
    assert len(str(err.value)) < 1000


def test_the_step_prints_one_error_line_and_writes_nothing(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("# nothing here\n")
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [sys.executable, "-m", "components.prepare_data", "--params", str(params), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]) and "Traceback" not in proc.stderr
    assert str(params) in errors[0] and "empty" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]

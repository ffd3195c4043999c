"""params.yaml validation: strict keys, ranges, and what `dvc exp run -S` writes back."""

from pathlib import Path

import pytest

from components.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_params_file_is_valid() -> None:
    p = load_params(ROOT / "params.yaml")
    assert p.model.name == "efficientnet_lite0" and set(p.finetune.methods) >= {"ft", "lp_ft", "daft"}


def test_bare_on_off_written_by_dvc_exp_run_is_accepted(tmp_path: Path) -> None:
    # DVC (YAML 1.2) rewrites "on" without quotes; PyYAML (YAML 1.1) then reads it as True.
    text = (ROOT / "params.yaml").read_text().replace('channels_last: "on"', "channels_last: on")
    assert "channels_last: on" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").finetune.channels_last == "on"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"finetune.epochs": -1}, "finetune.epochs"),
        ({"finetune.methods.daft.head_lr": "fast"}, "finetune.methods.daft.head_lr"),
        ({"finetune.methods.nope": {"start": "pretrained"}}, "unknown method"),
        ({"data.val_fraction": 0.9}, "val_fraction + test_fraction"),
        ({"linear_probe.c_min": 1000.0}, "c_min must be <= c_max"),
        ({"model.colour": "red"}, "model.colour"),
    ],
)
def test_invalid_values_name_the_key(override: dict, named: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", override)
    assert named in str(err.value)

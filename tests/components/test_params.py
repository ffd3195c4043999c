"""params.yaml validation: strict keys, ranges, and what `dvc exp run -S` writes back."""

from pathlib import Path

import pytest

from components.params import Params, ParamsError, load_params, params_from_dict
from daft_core.methods import get_recipe

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


# -- the one translation from params to core objects -----------------------------------------------


def _params(**methods: dict) -> Params:
    return params_from_dict({"finetune": {"methods": methods}})


def test_recipe_applies_the_lr_rule() -> None:
    p = _params(
        ft={"start": "pretrained", "lr": 0.05},
        daft={"start": "bn_converted", "lr": 0.02, "head_lr": 0.3},
        lp_ft={"start": "linear_probe"},
    )
    assert (p.recipe("ft").head_lr, p.recipe("ft").backbone_lr) == (0.05, 0.05)
    assert (p.recipe("daft").head_lr, p.recipe("daft").backbone_lr) == (0.3, 0.02)
    assert p.recipe("lp_ft") == get_recipe("lp_ft")  # nothing set: the catalogue's defaults
    with pytest.raises(ParamsError, match="not configured"):
        p.recipe("daft_bn_only")


def test_with_method_lrs_layers_on_top_by_the_same_rule() -> None:
    p = _params(daft={"start": "bn_converted", "head_lr": 0.3, "backbone_lr": 0.001})
    assert p.with_method_lrs("daft") is p
    both = p.with_method_lrs("daft", lr=1e-4, head_lr=0.1).recipe("daft")
    assert (both.head_lr, both.backbone_lr) == (0.1, 1e-4)
    head = p.with_method_lrs("daft", head_lr=1.0).recipe("daft")
    assert (head.head_lr, head.backbone_lr) == (1.0, 0.001)
    with pytest.raises(ParamsError):
        p.with_method_lrs("daft", lr=-1.0)


def test_unpublished_lrs_need_a_variant_name() -> None:
    """DAFT with equal lrs is not DAFT: refused with the rule and the remedy, accepted when named."""
    with pytest.raises(ParamsError, match=r"finetune.methods.daft: .*much faster.*variant: <name>"):
        _params(daft={"start": "bn_converted", "lr": 0.01})
    with pytest.raises(ParamsError, match="one learning rate"):
        _params(ft={"start": "pretrained", "head_lr": 0.1, "backbone_lr": 0.01})
    p = _params(daft={"start": "bn_converted", "lr": 0.01, "variant": "equal-lrs"})
    assert p.method("daft").variant == "equal-lrs" and p.recipe("daft").head_lr == 0.01
    with pytest.raises(ParamsError, match="variant"):  # a sweep point is checked by the same rule
        _params(daft={"start": "bn_converted", "head_lr": 1.0, "backbone_lr": 1e-4}).with_method_lrs(
            "daft", lr=0.01
        )
    with pytest.raises(ParamsError, match="pattern"):
        _params(daft={"start": "bn_converted", "lr": 0.01, "variant": "Bad Name!"})


def test_finetune_config_from_params() -> None:
    from components.finetune import finetune_config

    p = params_from_dict(
        {
            "finetune": {
                "epochs": 7,
                "batch_size": 32,
                "methods": {"ft": {"start": "pretrained", "epochs": 2}, "daft": {"start": "bn_converted"}},
            },
            "evaluate": {"batch_size": 99},
        }
    )
    assert finetune_config(p, "ft").epochs == 2  # the method's own epochs win
    c = finetune_config(p, "daft", seed=5)
    assert (c.epochs, c.batch_size, c.seed, c.eval_batch_size) == (7, 32, 5, 99)
    assert finetune_config(p, "daft_bn_only").epochs == 7  # not configured: the section's settings

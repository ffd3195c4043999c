"""Recipes are validated data: the loop trusts them, so invalid ones must fail at construction."""

from __future__ import annotations

import dataclasses

import pytest

from daft_core.methods import RECIPES, get_recipe
from daft_core.recipes import Recipe

EXPECTED = {"ft", "lp", "lp_ft", "daft", "daft_bn_only", "daft_fast_head_only"}


def test_all_methods_present_and_named_consistently() -> None:
    assert set(RECIPES) == EXPECTED
    for name, recipe in RECIPES.items():
        assert recipe.name == name


@pytest.mark.parametrize(
    ("name", "convert_bn", "head_init", "train_backbone", "bn_mode"),
    [
        ("ft", False, "random", True, "train"),
        ("lp", False, "random", False, "eval"),
        ("lp_ft", False, "probe", True, "eval"),
        ("daft", True, "zero", True, "train"),
        ("daft_bn_only", True, "zero", True, "eval"),  # official only_bn_conversion
        ("daft_fast_head_only", False, "zero", True, "eval"),  # official fast head only
    ],
)
def test_recipe_semantics(
    name: str, convert_bn: bool, head_init: str, train_backbone: bool, bn_mode: str
) -> None:
    r = RECIPES[name]
    assert (r.convert_bn, r.head_init, r.train_backbone, r.bn_mode) == (
        convert_bn,
        head_init,
        train_backbone,
        bn_mode,
    )


def test_learning_rate_structure() -> None:
    for name in ("ft", "lp_ft", "daft_bn_only"):
        assert RECIPES[name].head_lr == RECIPES[name].backbone_lr, name
    assert RECIPES["lp"].backbone_lr == 0.0
    assert RECIPES["lp_ft"].head_lr < RECIPES["ft"].head_lr
    for name in ("daft", "daft_fast_head_only"):
        r = RECIPES[name]
        assert 0.1 <= r.head_lr <= 10 and 1e-6 <= r.backbone_lr <= 1e-4
        assert r.head_lr >= 100 * r.backbone_lr


def test_get_recipe_applies_overrides_without_touching_registry() -> None:
    r = get_recipe("daft", head_lr=3.0, backbone_lr=1e-5)
    assert (r.name, r.head_lr, r.backbone_lr, r.convert_bn) == ("daft", 3.0, 1e-5, True)
    assert RECIPES["daft"].head_lr != 3.0
    assert get_recipe("ft") == RECIPES["ft"]


def test_recipes_are_frozen_and_json_able() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPES["ft"].head_lr = 1.0  # type: ignore[misc]
    d = RECIPES["daft"].to_dict()
    assert d["name"] == "daft" and Recipe(**d) == RECIPES["daft"]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown recipe 'daftt'") as info:
        get_recipe("daftt")
    for name in EXPECTED:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"head_lr": -0.1}, "head_lr must be finite and >= 0"),
        ({"backbone_lr": -1e-5}, "backbone_lr must be finite and >= 0"),
        ({"head_lr": float("nan")}, "head_lr must be finite"),
        ({"head_lr": "fast"}, "head_lr must be a number"),
        ({"head_init": "xavier"}, "head_init must be one of"),
        ({"bn_mode": "frozen"}, "bn_mode must be one of"),
        ({"convert_bn": "yes"}, "convert_bn must be a bool"),
        ({"learning_rate": 0.1}, "Unknown Recipe override"),
        ({"train_backbone": False}, "backbone is frozen"),
    ],
)
def test_bad_overrides_raise(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_recipe("ft", **overrides)


def test_freezing_backbone_with_zero_lr_is_fine() -> None:
    r = get_recipe("ft", train_backbone=False, backbone_lr=0.0)
    assert not r.train_backbone and r.backbone_lr == 0.0

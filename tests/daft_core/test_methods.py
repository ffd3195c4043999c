"""The method catalogue is the one home of the method list: everything else derives from it."""

from __future__ import annotations

import dataclasses

import pytest

from daft_core.methods import (
    FINETUNED_METHODS,
    METHOD_ORDER,
    METHODS,
    MIN_HEAD_RATIO,
    RECIPES,
    START_ALIASES,
    Method,
    alias_for,
    display_order,
    get_recipe,
    parse_lrs,
)
from daft_core.recipes import Recipe


def test_catalogue_entries_are_consistent() -> None:
    assert METHOD_ORDER[0] == "lp" and set(METHOD_ORDER) == set(RECIPES)
    assert set(FINETUNED_METHODS) == set(METHOD_ORDER) - {"lp"}
    aliases = [m.alias for m in METHODS.values()]
    assert len(set(aliases)) == len(aliases), "aliases must be unique"
    for name, m in METHODS.items():
        assert m.recipe is RECIPES[name] and m.recipe.name == name
        assert m.start in START_ALIASES
        assert "_" not in m.alias  # MLflow aliases here use dashes
        if m.recipe.head_init == "probe":
            assert m.start == "linear_probe", name
        if m.sweep == "lr":
            assert all(h == b for h, b in m.grid)
        for h, b in m.grid:  # every default sweep point is the published method
            assert m.published_violation(h, b) is None, (name, h, b)


def test_bad_entries_are_refused() -> None:
    ft = METHODS["ft"]
    with pytest.raises(ValueError, match="recipe is named"):
        dataclasses.replace(ft, name="other")
    with pytest.raises(ValueError, match="start must be one of"):
        dataclasses.replace(ft, start="nowhere")
    with pytest.raises(ValueError, match="one learning rate"):
        dataclasses.replace(ft, grid=((0.1, 0.01),))
    with pytest.raises(ValueError, match="much faster"):
        dataclasses.replace(METHODS["daft"], grid=((0.01, 0.01),))
    with pytest.raises(ValueError, match="must say how it is swept"):
        dataclasses.replace(ft, sweep="none")


def test_published_recipes_follow_the_official_definitions() -> None:
    """DAFT: conversion, zero head, train-mode BN, head lr >> backbone lr; the ablations as the official
    code defines them (only_bn_conversion: zero head, one lr, BN eval; fast head only: BN eval, head 1.0)."""
    daft = METHODS["daft"]
    assert (daft.recipe.convert_bn, daft.recipe.head_init, daft.recipe.bn_mode) == (True, "zero", "train")
    ratios = [h / b for h, b in daft.grid]
    assert min(ratios) >= MIN_HEAD_RATIO and max(ratios) >= 1e3  # the sweep reaches the paper's ratios
    bn_only = METHODS["daft_bn_only"].recipe
    assert (bn_only.convert_bn, bn_only.head_init, bn_only.bn_mode) == (True, "zero", "eval")
    assert METHODS["daft_bn_only"].sweep == "lr" and METHODS["daft_bn_only"].grid
    fast = METHODS["daft_fast_head_only"]
    assert (fast.recipe.convert_bn, fast.recipe.head_init, fast.recipe.bn_mode) == (False, "zero", "eval")
    assert {h for h, _ in fast.grid} == {1.0} and len(fast.grid) > 1  # its own backbone sweep


@pytest.mark.parametrize(
    ("name", "head", "backbone", "match"),
    [
        ("daft", 0.01, 0.01, "much faster than the backbone"),
        ("daft", 1e-4, 1e-2, "much faster than the backbone"),
        ("daft_fast_head_only", 0.05, 0.01, "much faster than the backbone"),
        ("ft", 0.1, 0.01, "one learning rate"),
        ("daft_bn_only", 1.0, 0.01, "one learning rate"),
    ],
)
def test_unpublished_lrs_are_named(name: str, head: float, backbone: float, match: str) -> None:
    assert match in (METHODS[name].published_violation(head, backbone) or "")


def test_published_lrs_pass() -> None:
    assert METHODS["daft"].published_violation(1.0, 1e-4) is None
    assert METHODS["daft"].published_violation(0.1, 0.01) is None  # exactly the least ratio
    assert METHODS["ft"].published_violation(0.1, 0.1) is None
    assert METHODS["lp"].published_violation(0.5, 0.0) is None  # the probe has no lrs to check


def test_adding_a_method_is_one_entry() -> None:
    """A new entry validates on its own; its alias and order come from the entry itself."""
    recipe = Recipe("ft_frozen_bn", False, "random", True, "eval", head_lr=0.01, backbone_lr=0.01)
    m = Method("ft_frozen_bn", recipe, start="pretrained", alias="ft-frozen-bn", grid=((0.01, 0.01),))
    assert m.lr_list() == [0.01] and m.to_dict()["grid"] == [[0.01, 0.01]]


def test_aliases_and_order() -> None:
    assert alias_for("lp_ft") == "lp-ft" and alias_for("bn_converted") == "bn-converted"
    assert alias_for("linear_probe") == alias_for("lp") == "linear-probe"
    with pytest.raises(ValueError):
        alias_for("nope")
    assert display_order(["zzz", "daft", "lp", "ft"]) == ["lp", "ft", "daft", "zzz"]


def test_get_recipe_overrides() -> None:
    r = get_recipe("daft", head_lr=3.0)
    assert r.head_lr == 3.0 and RECIPES["daft"].head_lr != 3.0
    with pytest.raises(ValueError, match="Unknown recipe"):
        get_recipe("daftt")


def test_lr_grid_syntax() -> None:
    assert parse_lrs("0.01, 0.1") == [(0.01, 0.01), (0.1, 0.1)]
    assert parse_lrs("1:1e-4,3:1e-4") == [(1.0, 1e-4), (3.0, 1e-4)]
    for bad, match in (("x", "not LR"), ("-1", ">= 0"), ("", "empty"), ("nan", "finite")):
        with pytest.raises(ValueError, match=match):
            parse_lrs(bad, "--grid")

"""The method catalogue is the one home of the method list: everything else derives from it."""

from __future__ import annotations

import dataclasses

import pytest

from daft_core.methods import (
    FINETUNED_METHODS,
    METHOD_ORDER,
    METHODS,
    RECIPES,
    START_ALIASES,
    Method,
    alias_for,
    display_order,
    get_recipe,
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
        if m.lr_from is not None:
            assert m.lr_from in FINETUNED_METHODS and m.lr_from != name
        if m.sweep == "lr":
            assert all(h == b for h, b in m.grid)


def test_bad_entries_are_refused() -> None:
    ft = METHODS["ft"]
    with pytest.raises(ValueError, match="recipe is named"):
        dataclasses.replace(ft, name="other")
    with pytest.raises(ValueError, match="start must be one of"):
        dataclasses.replace(ft, start="nowhere")
    with pytest.raises(ValueError, match="one lr for both groups"):
        dataclasses.replace(ft, grid=((0.1, 0.01),))
    with pytest.raises(ValueError, match="must say how it is swept"):
        dataclasses.replace(ft, sweep="none")


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
    r = get_recipe("daft", head_lr=1.0)
    assert r.head_lr == 1.0 and RECIPES["daft"].head_lr != 1.0
    with pytest.raises(ValueError, match="Unknown recipe"):
        get_recipe("daftt")

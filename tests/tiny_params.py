"""A shrunken params tree (tiny model, 1 epoch, few Cs) for stage and end-to-end tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

TINY: dict[str, Any] = {
    "pipeline": {"experiment": "daft-test", "registered_model": "daft-test", "tracking": False},
    "data": {"preset": "digits", "seed": 0, "printed_per_class": 4},
    "model": {"name": "tiny_cnn", "weights": None, "input_size": 16},
    "convert_bn": {"stats": "batch_mean", "batch_size": 64},
    "linear_probe": {"num_cs": 4, "c_min": 0.01, "c_max": 10.0, "device": "cpu"},
    "finetune": {
        "epochs": 1,
        "batch_size": 64,
        "seed": 0,
        "device": "cpu",
        "methods": {
            "ft": {"start": "pretrained", "lr": 0.01},
            "lp_ft": {"start": "linear_probe", "lr": 0.0001},
            "daft": {"start": "bn_converted", "head_lr": 0.1, "backbone_lr": 0.001},
        },
    },
    "evaluate": {"batch_size": 512, "device": "cpu"},
}


def tiny_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """Every key (DVC needs each listed param present), TINY on top, then per-section updates."""
    from components.params import Params

    out = Params().model_dump(mode="json")
    for key, update in copy.deepcopy(TINY).items():
        out[key].update(update)
    for key, update in sections.items():
        out.setdefault(key, {}).update(update)
    return out


def write_params(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path

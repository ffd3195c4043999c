"""Resume only the same run: a killed fine-tune continues from ``last.pt`` only when the recipe, config,
start weights and data all match; otherwise (or when the file is unreadable) it starts fresh with a warning
naming what differs, or, with ``resume="must"``, refuses with an error naming the file.

Tiny conv net and synthetic 8x8 images (helpers from tests/daft_core/test_finetune.py), single-threaded.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daft_core.faults import KILL_ENV
from daft_core.methods import get_recipe
from daft_core.recipes import Recipe
from daft_core.training import (
    CheckpointError,
    CheckpointMismatchError,
    FinetuneConfig,
    FinetuneResult,
    finetune,
)
from daft_core.training.checkpoint import CHECKPOINT_FORMAT, state_digest
from tests.daft_core.test_finetune import NUM_CLASSES, Images, TinyNet, make_set

KILL_POINT = "training.after_epoch_checkpoint"
REPO = Path(__file__).resolve().parents[2]
LOGGER = "daft_core.training"


class Killed(Exception):
    """Raised from the epoch callback: the in-process stand-in for a kill right after ``last.pt``."""


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add contention; also keeps CPU results bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pretrained(seed: int = 0) -> TinyNet:
    """A 'pretrained' start model: a few train-mode steps give it non-trivial BN running statistics."""
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ds = make_set(48, seed=3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(ds.images), ds.labels).backward()
        opt.step()
    return model.eval()


@dataclasses.dataclass
class Inputs:
    """Everything a run is given; ``go`` deep-copies the model so each run starts from the same weights."""

    model: nn.Module
    train: Images
    val: Images
    recipe: Recipe
    config: FinetuneConfig
    probe_head: nn.Linear | None = None

    def go(self, ckpt_dir: Path | None, **kw: Any) -> FinetuneResult:
        return finetune(
            copy.deepcopy(self.model),
            self.train,
            self.val,
            self.recipe,
            self.config,
            probe_head=self.probe_head,
            checkpoint_dir=ckpt_dir,
            **kw,
        )

    def killed(self, ckpt_dir: Path) -> None:
        """A run that dies right after epoch 1's checkpoint."""

        def die(record: dict[str, Any]) -> None:
            raise Killed

        with pytest.raises(Killed):
            self.go(ckpt_dir, callback=die)
        assert torch.load(ckpt_dir / "last.pt", weights_only=True)["epoch"] == 1


def config(**kw: Any) -> FinetuneConfig:
    base = {"epochs": 3, "batch_size": 8, "eval_batch_size": 16, "seed": 0, "device": "cpu"}
    return FinetuneConfig(**{**base, **kw})


def probe(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, NUM_CLASSES)


@pytest.fixture(scope="module")
def start(_single_thread: None) -> TinyNet:
    return pretrained(0)


@pytest.fixture
def inputs(start: TinyNet) -> Inputs:
    return Inputs(start, make_set(32, seed=1), make_set(24, seed=2), get_recipe("daft"), config())


def same_result(a: FinetuneResult, b: FinetuneResult) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return (
        sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
        and (a.best_epoch, a.best_val_accuracy) == (b.best_epoch, b.best_val_accuracy)
        and untimed(a.history) == untimed(b.history)
    )


def untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in history]


def stale(ckpt_dir: Path, name: str = "last.pt") -> list[Path]:
    return sorted(ckpt_dir.glob(f"{name}.stale-*"))


def warnings_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------------------------- (a) the same run


def _child(workdir: str) -> None:
    """Subprocess body: the same run as the parent's, killed by DAFT_KILL_AT after epoch 1's last.pt."""
    torch.set_num_threads(1)
    saved = torch.load(Path(workdir) / "inputs.pt", weights_only=True)
    model = TinyNet()
    model.load_state_dict(saved["model"])
    sets = [Images("toy", *saved[k], [str(c) for c in range(NUM_CLASSES)]) for k in ("train", "val")]
    finetune(model, *sets, get_recipe("daft"), config(), checkpoint_dir=Path(workdir) / "ckpt")
    raise SystemExit("the kill point did not fire")


def test_killed_process_resumes_bit_identically(inputs: Inputs, tmp_path: Path, caplog) -> None:
    full = inputs.go(tmp_path / "full")
    torch.save(
        {
            "model": inputs.model.state_dict(),
            "train": (inputs.train.images, inputs.train.labels),
            "val": (inputs.val.images, inputs.val.labels),
        },
        tmp_path / "inputs.pt",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tests.reliability.test_resume import _child; _child(sys.argv[1])",
            str(tmp_path),
        ],
        cwd=REPO,
        env={**os.environ, KILL_ENV: KILL_POINT, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 137, proc.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 1

    seen: list[int] = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed = inputs.go(ckpt, callback=lambda r: seen.append(r["epoch"]))
    assert seen == [2, 3]
    assert same_result(resumed, full)
    assert warnings_text(caplog) == "" and "resuming daft" in caplog.text
    assert stale(ckpt) == []


def test_eval_batch_size_does_not_block_resume(inputs: Inputs, tmp_path: Path, caplog) -> None:
    """Only what affects the trained weights is in the fingerprint."""
    full = inputs.go(None)
    inputs.killed(tmp_path)
    other = dataclasses.replace(inputs, config=dataclasses.replace(inputs.config, eval_batch_size=5))
    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resumed = other.go(tmp_path, callback=lambda r: seen.append(r["epoch"]), resume="must")
    assert seen == [2, 3] and warnings_text(caplog) == ""
    a, b = resumed.model.state_dict(), full.model.state_dict()  # val_loss may differ in the last bits
    assert all(torch.equal(a[k], b[k]) for k in b) and resumed.best_epoch == full.best_epoch


# ------------------------------------------------------------------------------ (b)-(d) another run


def _new_train(i: Inputs) -> Inputs:
    return dataclasses.replace(i, train=make_set(32, seed=7))


def _new_val(i: Inputs) -> Inputs:
    return dataclasses.replace(i, val=make_set(24, seed=8))


def _same_shape_train(i: Inputs) -> Inputs:
    """Same count, shape and labels; one pixel differs: only a content digest can tell."""
    images = i.train.images.clone()
    images[5, 0, 0, 0] ^= 1
    return dataclasses.replace(i, train=Images("toy", images, i.train.labels, i.train.class_names))


def _new_start(i: Inputs) -> Inputs:
    return dataclasses.replace(i, model=pretrained(1))


def _new_lr(i: Inputs) -> Inputs:
    return dataclasses.replace(i, recipe=dataclasses.replace(i.recipe, head_lr=i.recipe.head_lr * 2))


def _new_seed(i: Inputs) -> Inputs:
    return dataclasses.replace(i, config=dataclasses.replace(i.config, seed=3))


CHANGES: dict[str, tuple[Callable[[Inputs], Inputs], str]] = {
    "train data": (_new_train, "training data"),
    "train pixel": (_same_shape_train, "training data (sha256"),
    "val data": (_new_val, "validation data"),
    "start model": (_new_start, "start weights (weights"),
    "recipe lr": (_new_lr, "recipe (head_lr"),
    "config seed": (_new_seed, "config (seed: 0 -> 3)"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_another_run_starts_fresh_with_a_warning(change: str, inputs: Inputs, tmp_path: Path, caplog) -> None:
    mutate, named = CHANGES[change]
    inputs.killed(tmp_path / "ckpt")
    new = mutate(inputs)
    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = new.go(tmp_path / "ckpt", callback=lambda r: seen.append(r["epoch"]))
    assert seen == [1, 2, 3]
    text = warnings_text(caplog)
    assert named in text and str(tmp_path / "ckpt" / "last.pt") in text
    assert "different run" in text
    assert same_result(result, new.go(None))  # exactly a fresh run on the new inputs
    (moved,) = stale(tmp_path / "ckpt")
    assert str(moved) in text and torch.load(moved, weights_only=True)["epoch"] == 1
    assert len(stale(tmp_path / "ckpt", "best.pt")) == 1


def test_another_probe_head_starts_fresh(start: TinyNet, tmp_path: Path, caplog) -> None:
    """LP-FT: the probe head it starts from is part of the start state."""
    lp_ft = Inputs(start, make_set(32, seed=1), make_set(24, seed=2), get_recipe("lp_ft"), config(), probe(0))
    lp_ft.killed(tmp_path)
    new = dataclasses.replace(lp_ft, probe_head=probe(1))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = new.go(tmp_path)
    assert "start weights (probe_head" in warnings_text(caplog)
    assert same_result(result, new.go(None))


def test_only_the_newest_stale_copy_is_kept(inputs: Inputs, tmp_path: Path) -> None:
    inputs.killed(tmp_path)
    second = _new_seed(inputs)
    second.killed(tmp_path)  # sets the first aside
    first_stale = stale(tmp_path)
    _new_lr(inputs).go(tmp_path)  # sets the second aside
    (moved,) = stale(tmp_path)
    assert moved not in first_stale
    assert torch.load(moved, weights_only=True)["fingerprint_data"]["config"]["seed"] == 3
    assert len(stale(tmp_path, "best.pt")) == 1


# -------------------------------------------------------------------------- (e) resume="must" refuses


def test_must_refuses_another_run_naming_the_file(inputs: Inputs, tmp_path: Path) -> None:
    inputs.killed(tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    last = re.escape(str(tmp_path / "last.pt"))
    with pytest.raises(CheckpointMismatchError, match=rf"{last}.*training data") as info:
        _new_train(inputs).go(tmp_path, resume="must")
    assert isinstance(info.value, CheckpointError)  # the pipeline's one error path catches it
    with pytest.raises(CheckpointMismatchError, match=rf"{last}.*start weights.*Delete it"):
        _new_start(inputs).go(tmp_path, resume="must")
    assert (tmp_path / "last.pt").read_bytes() == before and stale(tmp_path) == []


def test_never_ignores_a_matching_checkpoint(inputs: Inputs, tmp_path: Path) -> None:
    inputs.killed(tmp_path)
    seen: list[int] = []
    result = inputs.go(tmp_path, resume="never", callback=lambda r: seen.append(r["epoch"]))
    assert seen == [1, 2, 3] and stale(tmp_path) == []
    assert same_result(result, inputs.go(None))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 3


def test_unknown_resume_mode_is_refused(inputs: Inputs, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resume must be one of"):
        inputs.go(tmp_path, resume="yes")


# ------------------------------------------------------------------------------- (f) unreadable last.pt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a torch checkpoint\n" * 20)


def _edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        ckpt = torch.load(path, weights_only=True)
        ckpt = fn(ckpt) or ckpt
        torch.save(ckpt, path)

    return apply


def _wrong_shapes(ckpt: dict[str, Any]) -> None:
    """Matching fingerprint, but weights that cannot be loaded: found only while resuming."""
    ckpt["model_state"] = {k: torch.zeros(2, *v.shape) for k, v in ckpt["model_state"].items()}


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "corrupt (unreadable"),
    "garbage": (_garbage, "corrupt (unreadable"),
    "not a dict": (_edit(lambda c: [1, 2, 3]), "corrupt (holds a list"),
    "missing keys": (_edit(lambda c: {"format": CHECKPOINT_FORMAT, "epoch": 1}), "missing keys"),
    "wrong type": (_edit(lambda c: c.update(history="oops")), "'history' is a str"),
    "non-tensor weights": (_edit(lambda c: c.update(model_state={"x": 1})), "holds non-tensors"),
    "wrong shapes": (_edit(_wrong_shapes), "does not fit this run"),
    "old format": (_edit(lambda c: c.update(format=1)), "checkpoint format 1"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_unreadable_checkpoint_is_set_aside(kind: str, inputs: Inputs, tmp_path: Path, caplog) -> None:
    corrupt, named = CORRUPTIONS[kind]
    inputs.killed(tmp_path)
    last = tmp_path / "last.pt"
    corrupt(last)
    damaged = last.read_bytes()

    start_digest = state_digest(inputs.model.state_dict())
    model = copy.deepcopy(inputs.model)
    with pytest.raises(CheckpointError, match=re.escape(str(last))):
        finetune(
            model, inputs.train, inputs.val, inputs.recipe, inputs.config,
            checkpoint_dir=tmp_path, resume="must",
        )  # fmt: skip
    assert last.read_bytes() == damaged and stale(tmp_path) == []
    assert state_digest(model.state_dict()) == start_digest  # refused before (or undone after) set-up
    assert all(p.requires_grad for p in model.parameters())

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = inputs.go(tmp_path)
    text = warnings_text(caplog)
    assert str(last) in text and named in text
    (moved,) = stale(tmp_path)
    assert moved.read_bytes() == damaged and str(moved) in text
    assert same_result(result, inputs.go(None))
    assert torch.load(last, weights_only=True)["epoch"] == 3


def test_start_digest_covers_every_dtype() -> None:
    """bf16 and 0-d tensors hash as raw bytes; a single flipped bit changes the digest."""
    state = {"a": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor(7), "m": torch.zeros(0, 2)}
    base = state_digest(state)
    assert base == state_digest(dict(reversed(state.items())))  # key order does not matter
    flipped = dict(state, n=torch.tensor(6))
    assert state_digest(flipped) != base
    assert state_digest(dict(state, a=torch.ones(3))) != base  # same values, another dtype

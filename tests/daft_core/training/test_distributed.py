"""Data-parallel fine-tuning on CPU (gloo, 2 processes): the maths of the global batch, and resume.

Each test spawns two processes that join the group through torchrun's environment variables (the path
`finetune` takes under ``torchrun``), on the tiny net and toy data of tests/daft_core/test_finetune.py.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from daft_core.augment import AugmentConfig
from daft_core.methods import get_recipe
from daft_core.training import FinetuneConfig, finetune
from daft_core.training.distributed import Dist, shard_batches
from tests.daft_core.test_finetune import TinyNet, make_set

NO_AUGMENT = AugmentConfig(hflip=False, random_resized_crop=False)
LR = 0.05  # large enough that the weights move far beyond the comparison tolerance


class Killed(Exception):
    pass


def _free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open while choosing, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_state(path: Path) -> None:
    """A 'pretrained' TinyNet with non-trivial BN statistics and a probe head, saved for every process."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    s = make_set(48, seed=3)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(s.images), s.labels).backward()
        opt.step()
    probe = nn.Linear(8, 3)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(3, 8, generator=torch.Generator().manual_seed(7)) * 0.3)
        probe.bias.zero_()
    torch.save({"model": model.state_dict(), "probe": probe.state_dict()}, path)


def _train(start: Path, recipe: str, config: dict[str, Any], **kw: Any):
    state = torch.load(start, weights_only=True)
    model = TinyNet()
    model.load_state_dict(state["model"])
    train, val = make_set(32, seed=1), make_set(24, seed=2)
    return finetune(
        model,
        train,
        val,
        get_recipe(recipe, head_lr=LR, backbone_lr=LR),
        FinetuneConfig(**config),
        probe_head=state["probe"] if recipe == "lp_ft" else None,
        **kw,
    )


def _record_or_die(seen: list[int], kill_after: int | None, record: dict[str, Any]) -> None:
    seen.append(int(record["epoch"]))
    if record["epoch"] == kill_after:
        raise Killed


def _worker(rank: int, world: int, ports: list[int], job: dict[str, Any]) -> None:
    """One rank, launched as torchrun would (the group comes from the environment), running ``job["runs"]``
    one after another; with ``job["own_group"]`` it initialises the group itself, as a library caller may."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ports[0]),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    if job.get("own_group"):
        torch.distributed.init_process_group("gloo")
    outcomes = []
    for i, run in enumerate(job["runs"]):
        # A fresh rendezvous port per session: a rank that starts the next run while the other still
        # tears down the previous group must not find (and wait on) the old store.
        os.environ["MASTER_PORT"] = str(ports[i])
        seen: list[int] = []
        callback = functools.partial(_record_or_die, seen, run.get("kill_after"))
        try:
            recipe, config = run.get("recipe", job["recipe"]), {**job["config"], **run.get("config", {})}
            result = _train(Path(job["start"]), recipe, config, callback=callback, **run.get("kw", {}))
        except Killed:
            outcomes.append({"killed": True, "seen": seen})
            continue
        outcomes.append(
            {
                "state": result.model.state_dict(),
                "history": result.history,
                "best_epoch": result.best_epoch,
                "world_size": result.world_size,
                "seen": seen,
                "group_after": torch.distributed.is_initialized(),
            }
        )
    torch.save(outcomes, Path(job["out"]) / f"rank{rank}.pt")
    if job.get("own_group"):
        torch.distributed.destroy_process_group()


def _spawn(
    tmp: Path, start: Path, recipe: str, config: dict[str, Any], runs: list[dict[str, Any]], **job: Any
) -> list[list[dict[str, Any]]]:
    """Run ``finetune`` on 2 ranks, once per entry of ``runs``; ``[run][rank]`` outcomes."""
    out = tmp / "outcomes"
    out.mkdir(exist_ok=True)
    job = {"out": str(out), "start": str(start), "recipe": recipe, "config": config, "runs": runs, **job}
    ports = _free_ports(len(runs))
    mp.spawn(_worker, args=(2, ports, job), nprocs=2, join=True)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return [list(pair) for pair in zip(*per_rank, strict=True)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in history]


@pytest.fixture
def start(tmp_path: Path) -> Path:
    torch.set_num_threads(1)
    path = tmp_path / "start.pt"
    _start_state(path)
    return path


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(start: Path, tmp_path: Path) -> None:
    """No augmentation. BN frozen (lp_ft): the averaged gradient of the two per-rank halves is the gradient
    of the whole global batch, so the weights must match one process with twice the batch. BN in train
    mode (ft, per-rank statistics: the default) does not: each rank normalises its own half."""
    config = {"epochs": 2, "batch_size": 4, "eval_batch_size": 16, "device": "cpu", "augment": NO_AUGMENT}
    lp_ft, ft_local = _spawn(tmp_path, start, "lp_ft", config, [{}, {"recipe": "ft"}])
    single = _train(start, "lp_ft", {**config, "batch_size": 8})
    half = _train(start, "lp_ft", config)  # one process at the per-rank batch: a different run
    single_ft = _train(start, "ft", {**config, "batch_size": 8}).model.state_dict()
    initial = torch.load(start, weights_only=True)["model"]

    assert [r["world_size"] for r in lp_ft] == [2, 2] and single.world_size == 1
    for ranks in (lp_ft, ft_local):  # every rank returns the same model
        assert _max_diff(ranks[0]["state"], ranks[1]["state"]) == 0.0
    assert _max_diff(lp_ft[0]["state"], single.model.state_dict()) < 1e-5
    assert _max_diff(_backbone(initial), _backbone(single.model.state_dict())) > 1e-3  # the test can fail
    assert _max_diff(lp_ft[0]["state"], half.model.state_dict()) > 1e-3
    for a, b in zip(lp_ft[0]["history"], single.history, strict=True):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)  # mean over all ranks' images
        assert a["world_size"] == 2 and b["world_size"] == 1
    assert _max_diff(ft_local[0]["state"], single_ft) > 1e-4
    assert not any(r["group_after"] for r in lp_ft)  # the group finetune joined is left again


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def test_killed_ddp_run_resumes_to_the_uninterrupted_result(start: Path, tmp_path: Path) -> None:
    """DAFT (BN conversion on shards, train-mode BN, per-rank augmentation) stopped after epoch 1 and
    resumed on 2 ranks ends with exactly the uninterrupted 2-rank run's weights and history. The ranks
    initialise the group themselves here (a library caller's way); finetune leaves such a group alone."""
    config = {"epochs": 3, "batch_size": 4, "eval_batch_size": 16, "device": "cpu"}
    ckpt = tmp_path / "b"
    runs = [
        {"kw": {"checkpoint_dir": str(tmp_path / "a")}},
        {"kw": {"checkpoint_dir": str(ckpt)}, "kill_after": 1},
        {"kw": {"checkpoint_dir": str(ckpt)}},
    ]
    full, killed, resumed = _spawn(tmp_path, start, "daft", config, runs, own_group=True)
    assert [r.get("killed") for r in killed] == [True, True]
    assert [r["seen"] for r in resumed] == [[2, 3], [2, 3]]
    for r in range(2):
        assert _max_diff(resumed[r]["state"], full[0]["state"]) == 0.0
        assert _untimed(resumed[r]["history"]) == _untimed(full[0]["history"])
        assert resumed[r]["group_after"]  # the caller's group is still there
    assert resumed[0]["best_epoch"] == full[0]["best_epoch"]
    last = torch.load(ckpt / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and len(last["rng_ranks"]) == 2
    assert last["fingerprint_data"]["config"]["world_size"] == 2
    assert not torch.equal(last["rng_ranks"][0]["augment"], last["rng_ranks"][1]["augment"])
    assert not list(tmp_path.glob("b/*.stale-*"))  # the checkpoint was resumed, not set aside


def test_one_process_does_not_resume_a_two_rank_checkpoint(start: Path, tmp_path: Path, caplog) -> None:
    """The global batch differs, so a 1-process run sets a 2-rank last.pt aside and starts fresh."""
    config = {"epochs": 1, "batch_size": 4, "eval_batch_size": 16, "device": "cpu", "augment": NO_AUGMENT}
    _spawn(tmp_path, start, "ft", config, [{"kw": {"checkpoint_dir": str(tmp_path / "c")}}])
    seen: list[int] = []
    _train(start, "ft", config, checkpoint_dir=tmp_path / "c", callback=lambda r: seen.append(r["epoch"]))
    assert seen == [1]
    assert "world_size: 2 -> 1" in caplog.text


def test_shards_tile_each_global_batch_of_one_permutation() -> None:
    """Rank r's batch g is the r-th contiguous slice of global batch g; the ragged tail is dropped."""
    data = make_set(23, seed=0)
    data.labels = torch.arange(23)  # labels as indices: which images each rank got
    per_rank = [
        [
            y.tolist()
            for _, y in shard_batches(
                data, 3, Dist(r, 2), generator=torch.Generator().manual_seed(5), device=torch.device("cpu")
            )
        ]
        for r in range(2)
    ]
    order = torch.randperm(23, generator=torch.Generator().manual_seed(5)).tolist()
    assert [len(b) for b in per_rank[0]] == [3, 3, 3] == [len(b) for b in per_rank[1]]
    for g in range(3):
        assert per_rank[0][g] + per_rank[1][g] == order[6 * g : 6 * g + 6]

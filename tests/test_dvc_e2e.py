"""End to end: `dvc repro` of a shrunken params file in a temporary git repo, tracked to a real MLflow
server (artifacts on a moto S3 server), then caching, selective reruns and an S3 remote round trip."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.warm_start import stop_servers
from tests.servers import MlflowServer
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _copy_project(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored): uncommitted work is tested too."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    )
    return res.stdout + res.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer
) -> Iterator[tuple[Path, dict[str, str]]]:
    repo = tmp_path_factory.mktemp("repo")
    warm = tmp_path_factory.mktemp("warm")  # this module's warm-start servers (the stages run under DVC)
    os.chmod(warm, 0o700)
    tree = tiny_params(pipeline={"tracking": True, "experiment": "daft-e2e", "registered_model": "daft-e2e"})
    env = git_project(
        repo,
        tree,
        {**mlflow_server.s3.env, "MLFLOW_TRACKING_URI": mlflow_server.uri, "DAFT_WARM_DIR": str(warm)},
    )
    yield repo, env
    stop_servers(warm)


def git_project(
    repo: Path, params: dict, extra_env: dict[str, str], drop: tuple[str, ...] = ("MLFLOW_", "DAFT_")
) -> dict[str, str]:
    """The project copied into `repo` with `params` as its params.yaml, committed to a fresh git repo;
    returns the environment to run dvc there (variables starting with `drop` removed, `extra_env` added)."""
    _copy_project(repo)
    write_params(repo / "params.yaml", params)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra_env)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "snapshot"], repo, env)
    return env


@pytest.fixture(scope="module")
def first_repro(project: tuple[Path, dict[str, str]]) -> str:
    repo, env = project
    return _run([str(BIN / "dvc"), "repro"], repo, env)


def test_repro_runs_every_stage_and_writes_outputs(project, first_repro: str) -> None:
    repo, env = project
    assert _stages_run(first_repro) >= {
        "prepare_data",
        "pretrained",
        "convert_bn",
        "linear_probe",
        "finetune@ft",
        "finetune@lp_ft",
        "finetune@daft",
        "evaluate@ft",
        "evaluate@lp_ft",
        "evaluate@daft",
        "evaluate_lp",
        "report",
    }
    for method in ("lp", "ft", "lp_ft", "daft"):
        m = json.loads((repo / f"metrics/methods/{method}.json").read_text())
        assert 0 <= m["id_test_accuracy"] <= 1 and set(m["ood"]) == {"printed", "corrupted"}
    assert (repo / "reports/id_vs_ood.png").stat().st_size > 1000
    assert (repo / "dvc.lock").is_file()
    # Warm start: the first stage started a server, later ones ran in its workers (the registry and
    # lineage checks below read what those workers tracked).
    logs = "".join(p.read_text() for p in Path(env["DAFT_WARM_DIR"]).glob("*.log"))
    ran = re.findall(r"worker \d+ \((components\.\w+)\) exit 0", logs)
    assert "components.report" in ran and len(ran) >= 8, logs
    # ... and what the workers logged reached DVC's output, as a plain stage's would.
    assert "warm start: running in worker" in first_repro and "report written to" in first_repro


def test_second_repro_runs_nothing(project, first_repro: str) -> None:
    repo, env = project
    out = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert _stages_run(out) == set(), out


def test_registry_aliases_and_model_reproduces_evaluated_accuracy(
    project, first_repro: str, mlflow_server
) -> None:
    import mlflow
    import torch
    from mlflow import MlflowClient

    from daft_core.data import load_bundle
    from daft_core.evaluate import evaluate

    repo, _ = project
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    versions = {}
    for alias in ("pretrained", "bn-converted", "linear-probe", "ft", "lp-ft", "daft", "champion"):
        v = client.get_model_version_by_alias("daft-e2e", alias)
        versions[alias] = v
        assert v.tags["stage"] and "source_version" in v.tags
    assert versions["daft"].tags["method"] == "daft"
    assert versions["daft"].tags["source_version"] == versions["bn-converted"].version  # lineage
    assert versions["lp-ft"].tags["source_version"] == versions["linear-probe"].version
    summary = json.loads((repo / "reports/summary.json").read_text())
    assert (
        versions["champion"].version
        == versions[
            {"lp": "linear-probe", "lp_ft": "lp-ft"}.get(summary["champion"], summary["champion"])
        ].version
    )

    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pytorch.load_model("models:/daft-e2e@daft")
    bundle = load_bundle(repo / "data/prepared")
    torch.set_num_threads(1)
    got = evaluate(model, {"id_test": bundle.test}, batch_size=512, device="cpu")["sets"]["id_test"][
        "accuracy"
    ]
    expected = json.loads((repo / "metrics/methods/daft.json").read_text())["id_test_accuracy"]
    assert got == expected

    # one parent run for the whole repro, a child per step, with lineage of the dataset
    exp = client.get_experiment_by_name("daft-e2e")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("daft.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("daft.role") == "step"]
    assert len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert len(children) >= 12
    finetune_daft = next(
        r
        for r in children
        if r.data.tags.get("daft.step") == "finetune" and r.data.tags.get("daft.method") == "daft"
    )
    assert client.get_metric_history(finetune_daft.info.run_id, "val_accuracy")[0].step == 1
    assert finetune_daft.inputs.dataset_inputs or finetune_daft.data.tags.get("daft.data_digest")


def test_changing_one_finetune_param_reruns_only_its_branch(project, first_repro: str) -> None:
    repo, env = project
    tree = tiny_params(pipeline={"tracking": True, "experiment": "daft-e2e", "registered_model": "daft-e2e"})
    tree["finetune"]["methods"]["daft"]["head_lr"] = 0.05
    write_params(repo / "params.yaml", tree)
    out = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert _stages_run(out) == {"finetune@daft", "evaluate@daft", "report"}, out


def test_s3_remote_push_pull_round_trip(project, first_repro: str, mlflow_server) -> None:
    repo, env = project
    s3 = mlflow_server.s3
    dvc = str(BIN / "dvc")
    _run([dvc, "remote", "add", "-f", "-d", "storage", f"s3://{s3.bucket}/dvcstore"], repo, env)
    _run([dvc, "remote", "modify", "storage", "endpointurl", s3.endpoint], repo, env)
    before = _digest(repo / "data/prepared")
    _run([dvc, "push", "prepare_data"], repo, env)
    assert any(k.startswith("dvcstore/") for k in s3.keys("dvcstore/"))
    shutil.rmtree(repo / "data/prepared")
    shutil.rmtree(repo / ".dvc/cache")
    _run([dvc, "pull", "prepare_data"], repo, env)
    assert _digest(repo / "data/prepared") == before

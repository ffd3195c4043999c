"""No data lost: a step replaces only a previous output of its own, never an input or an unrelated folder,
and a kill at any moment of an atomic write leaves the old or the new output, whole, with nothing beside it.

Kill tests run daft_core.atomic in a tiny ``python -c`` subprocess (DAFT_KILL_AT, daft_core.faults); one
end-to-end kill goes through ``python -m components.report``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components import convert_bn, evaluate, linear_probe, prepare_data, pretrained, report
from components.common import StepError
from components.outputs import MARKER, check_outputs, marker, read_marker
from components.params import params_from_dict
from daft_core.atomic import recover
from daft_core.faults import KILL_ENV
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]
KILLED = 137

DIR_KILLS = {  # kill point -> what is in place after recovery
    "atomic.after_write_new": "old",
    "atomic.after_move_aside": "old",
    "atomic.after_rename_new": "new",
    "atomic.before_delete_old": "new",
    "atomic.during_delete_old": "new",
    "test.mid_write": "old",
}
FILE_KILLS = {
    "atomic.file_after_write": "old",
    "atomic.file_after_replace": "new",
    "test.mid_write": "old",
}

WRITER = """
import sys
from daft_core.atomic import atomic_dir, atomic_file
from daft_core.faults import kill_point
kind, target, text = sys.argv[1:4]
if kind == "dir":
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text(text)
        (tmp / "sub" / "b.txt").write_text(text)
        kill_point("test.mid_write")
else:
    with atomic_file(target, "w") as f:
        f.write(text)
        kill_point("test.mid_write")
"""


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if kill_at:
        env[KILL_ENV] = kill_at
    return env


def _write(kind: str, target: Path, text: str, kill_at: str | None = None) -> int:
    res = subprocess.run(
        [sys.executable, "-c", WRITER, kind, str(target), text],
        env=_env(kill_at),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode in (0, KILLED), res.stderr
    return res.returncode


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _content(kind: str, target: Path) -> str:
    """The one text the output holds (a torn output would hold two, or miss a file)."""
    if kind == "file":
        return target.read_text()
    files = _snapshot(target)
    assert set(files) == {"a.txt", "sub/b.txt"}, f"incomplete output: {sorted(files)}"
    texts = {v.decode() for v in files.values()}
    assert len(texts) == 1, f"mixed output: {texts}"
    return texts.pop()


# --- kills at every moment of a swap --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "point"), [("dir", p) for p in DIR_KILLS] + [("file", p) for p in FILE_KILLS]
)
def test_a_kill_at_any_point_leaves_a_whole_output_and_no_orphans(
    kind: str, point: str, tmp_path: Path
) -> None:
    target = tmp_path / ("out" if kind == "dir" else "out.json")
    assert _write(kind, target, "old") == 0
    assert _write(kind, target, "new", kill_at=point) == KILLED
    expected = (DIR_KILLS if kind == "dir" else FILE_KILLS)[point]

    recover(target)  # what every write of `target` and every step's up-front check does first
    assert _content(kind, target) == expected
    assert os.listdir(tmp_path) == [target.name], "orphan temporaries beside the output"

    assert _write(kind, target, "newer") == 0
    assert _content(kind, target) == "newer"
    assert os.listdir(tmp_path) == [target.name]


@pytest.mark.parametrize("point", ["atomic.after_write_new", "atomic.after_rename_new", "test.mid_write"])
def test_a_kill_during_a_first_write_then_a_rerun(point: str, tmp_path: Path) -> None:
    target = tmp_path / "out"
    assert _write("dir", target, "new", kill_at=point) == KILLED
    assert _write("dir", target, "newer") == 0
    assert _content("dir", target) == "newer"
    assert os.listdir(tmp_path) == ["out"]


def test_stale_temporaries_of_earlier_kills_are_removed_by_the_next_write(tmp_path: Path) -> None:
    out, resume = tmp_path / "out", tmp_path / "resume"
    assert _write("dir", out, "old") == 0
    stale_dirs = [
        ".out.daft-new-1a2b",
        ".out.daft-del-3c4d",
        ".out.daft-old",
        ".out.old-4242",
        ".out.tmp-77aa",
    ]
    stale_dirs += [".out.abcd_123.tmp", ".out.q1w2e3r4.old"]  # the first daft_core.atomic's mkdtemp names
    for name in stale_dirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "junk").write_text("x")
    (tmp_path / ".out.9f8e7d6c5b4a.tmp").write_text("torn")
    unrelated = [".out.json.abcdefgh.tmp", ".outer.daft-old", "out.txt", ".other.abcdefgh.tmp"]
    for name in unrelated:
        (tmp_path / name).write_text("keep")
    resume.mkdir()
    (resume / "last.pt").write_text("complete")
    for torn in (".last.pt.a1b2c3d4.tmp", ".last.pt.tmpx9y8", ".last.pt.0123456789ab.tmp"):
        (resume / torn).write_text("torn")
    (resume / "last.pt.stale-20240101").write_text("kept by the resume logic")

    assert _write("dir", out, "new") == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "resume", *unrelated])
    assert _content("dir", out) == "new"

    assert _write("file", resume / "last.pt", "next epoch") == 0
    assert sorted(os.listdir(resume)) == ["last.pt", "last.pt.stale-20240101"]


def test_an_old_style_aside_is_put_back(tmp_path: Path) -> None:
    """A kill in the previous implementation's swap left the output only at ``.<name>.old-<pid>``."""
    (tmp_path / ".out.old-1234").mkdir()
    (tmp_path / ".out.old-1234" / "a.txt").write_text("old")
    (tmp_path / ".out.tmp-5678").mkdir()  # its half-written successor
    assert recover(tmp_path / "out") == tmp_path / ".out.old-1234"
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


# --- steps replace only their own outputs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def params() -> Any:
    return params_from_dict(tiny_params())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, params: Any) -> Path:
    data = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data.run(params, data)
    return data


def _unrelated(folder: Path) -> dict[str, bytes]:
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "notes" / "ideas.md").write_text("more")
    return _snapshot(folder)


def test_the_cli_refuses_an_unrelated_folder_and_leaves_every_file(tmp_path: Path, prepared: Path) -> None:
    write_params(tmp_path / "params.yaml", tiny_params())
    before = _unrelated(tmp_path / "mine")
    res = subprocess.run(
        [sys.executable, "-m", "components.pretrained", "--data", str(prepared), "--out", "mine"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "mine" in errors[0] and "choose a new or empty folder, or delete it yourself" in errors[0]
    assert _snapshot(tmp_path / "mine") == before
    assert sorted(os.listdir(tmp_path)) == ["mine", "params.yaml"]


@pytest.mark.parametrize("step", ["prepare_data", "pretrained", "convert_bn", "linear_probe", "report"])
def test_every_step_refuses_an_unrelated_folder(
    step: str, tmp_path: Path, params: Any, prepared: Path
) -> None:
    out = tmp_path / "out"
    before = _unrelated(out)
    model = tmp_path / "model"  # never read: the check comes before any work
    calls = {
        "prepare_data": lambda: prepare_data.run(params, out),
        "pretrained": lambda: pretrained.run(params, prepared, out),
        "convert_bn": lambda: convert_bn.run(params, model, prepared, out),
        "linear_probe": lambda: linear_probe.run(params, model, prepared, out),
        "report": lambda: report.run(params, tmp_path / "metrics", out),
    }
    with pytest.raises(StepError, match=rf"refusing to replace {out}: a non-empty folder without"):
        calls[step]()
    assert _snapshot(out) == before


def test_out_equal_to_data_is_refused_and_the_dataset_is_intact(params: Any, prepared: Path) -> None:
    before = _snapshot(prepared)
    with pytest.raises(StepError, match=f"refusing to write {prepared}: it is the input {prepared}"):
        pretrained.run(params, prepared, prepared)
    assert _snapshot(prepared) == before


@pytest.mark.parametrize(
    ("out", "relation"), [("data", "is"), ("data/inner", "is inside"), (".", "contains")]
)
def test_an_output_overlapping_an_input_is_refused(tmp_path: Path, out: str, relation: str) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(StepError, match=f"it {relation} the input"):
        check_outputs("convert_bn", dirs=[tmp_path / out], inputs=[tmp_path / "model", tmp_path / "data"])
    with pytest.raises(StepError, match=f"it {relation} the input"):
        check_outputs("evaluate", files=[tmp_path / out], inputs=[tmp_path / "data"])


def test_outputs_that_overlap_each_other_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StepError, match="the output"):
        check_outputs("finetune", dirs=[tmp_path / "out"], files=[tmp_path / "out" / "curves.json"])


def test_what_a_step_may_and_may_not_replace(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()  # what Kubeflow hands a step
    check_outputs("report", dirs=[tmp_path / "empty", tmp_path / "missing"])

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MARKER).write_text(json.dumps(marker("pretrained")))
    with pytest.raises(StepError, match="output of step `pretrained`, not `report`"):
        check_outputs("report", dirs=[tmp_path / "other"])

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / MARKER).write_text("{not json")
    with pytest.raises(StepError, match="not this project's"):
        check_outputs("report", dirs=[tmp_path / "foreign"])

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StepError, match="it is a file, not an output folder"):
        check_outputs("report", dirs=[tmp_path / "a_file"])
    with pytest.raises(StepError, match="is a file, not a folder"):
        check_outputs("report", dirs=[tmp_path / "a_file" / "out"])

    check_outputs("evaluate", files=[tmp_path / "a_file"])  # an existing file output: its own JSON
    with pytest.raises(StepError, match="it is a folder, the step writes a file"):
        check_outputs("evaluate", files=[tmp_path / "empty"])


def test_evaluate_refuses_a_folder_at_its_metrics_path(tmp_path: Path, params: Any, prepared: Path) -> None:
    before = _unrelated(tmp_path / "metrics" / "ft.json")
    with pytest.raises(StepError, match="it is a folder, the step writes a file"):
        evaluate.run(params, "ft", tmp_path / "m", None, prepared, tmp_path / "metrics" / "ft.json")
    assert _snapshot(tmp_path / "metrics" / "ft.json") == before


def test_a_step_replaces_its_own_previous_output(tmp_path: Path, params: Any, prepared: Path) -> None:
    out = tmp_path / "pretrained"
    out.mkdir()  # empty, as from Kubeflow
    pretrained.run(params, prepared, out)
    assert read_marker(out) == {"format": 1, "project": "daft-pipeline", "step": "pretrained"}
    (out / "stale.txt").write_text("from the first run")
    pretrained.run(params, prepared, out)
    assert {p.name for p in out.iterdir()} == {MARKER, "model.pt", "info.json"}
    assert os.listdir(tmp_path) == ["pretrained"]

    with pytest.raises(StepError, match="output of step `pretrained`, not `convert_bn`"):
        convert_bn.run(params, tmp_path / "m", prepared, out)
    with pytest.raises(StepError, match="output of step `pretrained`, not `linear_probe`"):
        linear_probe.run(params, tmp_path / "m", prepared, out)


def test_prepare_data_marks_and_replaces_its_own_bundle(tmp_path: Path, params: Any, prepared: Path) -> None:
    assert read_marker(prepared) == marker("prepare_data")
    copy = tmp_path / "data"
    copy.mkdir()
    for name, blob in _snapshot(prepared).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(blob)
    (copy / "stale.txt").write_text("x")
    prepare_data.run(params, copy)
    assert _snapshot(copy) == _snapshot(prepared)  # deterministic, and the stale file is gone
    assert os.listdir(tmp_path) == ["data"]


# --- end to end: a report killed mid-swap, then rerun ---------------------------------------------------


def _metrics(folder: Path) -> None:
    folder.mkdir()
    for method, val in (("ft", 0.8), ("daft", 0.9)):
        row = {
            "method": method,
            "id_val_accuracy": val,
            "id_test_accuracy": val - 0.05,
            "ood": {"printed": val - 0.3},
            "ood_mean_accuracy": val - 0.3,
        }
        (folder / f"{method}.json").write_text(json.dumps(row))


def test_a_report_killed_mid_swap_is_whole_after_a_rerun(tmp_path: Path, params: Any) -> None:
    write_params(tmp_path / "params.yaml", tiny_params())
    _metrics(tmp_path / "metrics")

    def report_cli(kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "components.report", "--metrics", "metrics", "--out", "reports/out"],
            cwd=tmp_path,
            env=_env(kill_at),
            capture_output=True,
            text=True,
            timeout=120,
        )

    report.run(params, tmp_path / "metrics", tmp_path / "reports" / "out")
    first = _snapshot(tmp_path / "reports" / "out")
    assert MARKER in first and "summary.json" in first
    res = report_cli("atomic.after_move_aside")
    assert res.returncode == KILLED
    assert not (tmp_path / "reports" / "out").exists()  # the old report is only aside now

    res = report_cli()
    assert res.returncode == 0, res.stderr
    assert set(_snapshot(tmp_path / "reports" / "out")) == set(first)
    assert os.listdir(tmp_path / "reports") == ["out"]


def test_a_report_folder_from_before_markers_is_replaced_but_not_a_foreign_file_in_it(
    tmp_path: Path, params: Any
) -> None:
    """DVC deletes only the report files it tracks; git keeps table.md and id_vs_ood.png (no marker)."""
    _metrics(tmp_path / "metrics")
    out = tmp_path / "reports"
    out.mkdir()
    (out / "table.md").write_text("old table")
    (out / "id_vs_ood.png").write_bytes(b"old")
    report.run(params, tmp_path / "metrics", out)
    assert read_marker(out) == marker("report") and (out / "table.md").read_text() != "old table"

    (out / MARKER).unlink()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(StepError, match="a non-empty folder without"):
        report.run(params, tmp_path / "metrics", out)
    assert (out / "thesis.tex").read_text() == "mine"

"""Smoke test of `python -m benchmarks.compare_methods` on a tiny setting (tiny_cnn, 64 train images)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib

import pytest

from benchmarks import compare_methods as cm

ALL = set(cm.ALL_METHODS)
ROWS = ALL | {m + cm.WISE for m in cm.FINETUNED}  # every fine-tuned method has its WiSE-FT row


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    out = tmp_path_factory.mktemp("cm") / "res"
    argv = [
        "--preset", "digits", "--model", "tiny_cnn", "--weights", "none", "--input-size", "16",
        "--max-train", "64", "--epochs", "1", "--seeds", "3", "--threads", "1",
        "--grid", "ft=0.01,0.1,0.3", "--lr", "lp_ft=0.001", "--lr", "daft=0.01:0.001",
        "--grid", "daft_bn_only=0.01", "--grid", "daft_fast_head_only=1.0:0.001,1.0:0.01",
        "--out", str(out),
    ]  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        results = cm.main(argv)
    stdout = buf.getvalue()
    line = stdout.strip().splitlines()[-1]
    return results, json.loads(line), str(out)


def test_json_line_has_every_method_with_mean_std(run: tuple[dict, dict, str]) -> None:
    results, parsed, _ = run
    assert parsed == json.loads(json.dumps(results))  # the printed line is the returned object
    assert parsed["partial"] is False
    assert set(parsed["methods"]) == ROWS
    ood = parsed["ood_sets"]
    assert set(ood) == {"printed", "corrupted"}
    for method, res in parsed["methods"].items():
        s = res["summary"]
        assert len(res["per_seed"]) == 3, method
        for key in ["acc.id_val", "acc.id_test", "acc.ood_mean", *(f"acc.{n}" for n in ood)]:
            assert set(s[key]) >= {"mean", "std"}, (method, key)
            assert 0.0 <= s[key]["mean"] <= 1.0 and s[key]["std"] >= 0.0, (method, key)
        for key in ("dist_l2", "dist_cos"):
            for where in ("id_test", "ood_mean", *ood):
                stat = s[f"{key}.{where}"]
                assert math.isfinite(stat["mean"]) and stat["std"] >= 0.0, (method, key, where)
        for rec in res["per_seed"]:
            for k, v in rec["metrics"].items():
                if k.startswith("acc."):
                    assert 0.0 <= v <= 1.0, (method, k)


def test_lp_has_no_distortion_and_zero_std(run: tuple[dict, dict, str]) -> None:
    s = run[1]["methods"]["lp"]["summary"]
    assert s["dist_l2.id_test"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert s["dist_cos.id_test"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert s["acc.id_test"]["std"] == pytest.approx(0.0, abs=1e-12)  # one probe for every seed


def test_selection_is_argmax_of_id_val(run: tuple[dict, dict, str]) -> None:
    methods = run[1]["methods"]
    ft = methods["ft"]
    accs = [r["val_accuracy"] for r in ft["sweep"]]
    assert len(accs) == 3
    best = max(a for a in accs if a is not None)
    idx = accs.index(best)  # ties go to the earliest grid entry
    chosen = ft["sweep"][idx]
    assert (ft["selected"]["head_lr"], ft["selected"]["backbone_lr"]) == (
        chosen["head_lr"],
        chosen["backbone_lr"],
    )
    assert "ID val" in ft["selection"]
    # The seed-0 result is the selected sweep run itself (same ID val), not a re-run selected on test.
    assert ft["per_seed"][0]["val_accuracy"] == best
    assert ft["per_seed"][0]["seed"] == 0
    # LP: the C with the best ID val accuracy (ties: smaller C).
    lp = methods["lp"]
    lp_best = max(r["val_accuracy"] for r in lp["sweep"])
    first = next(r for r in lp["sweep"] if r["val_accuracy"] == lp_best)
    assert lp["selected"]["C"] == first["C"]
    # The ablations have sweeps of their own (no inherited lrs); every point is recorded with its lrs.
    fast = methods["daft_fast_head_only"]
    assert [(r["head_lr"], r["backbone_lr"]) for r in fast["sweep"]] == [(1.0, 0.001), (1.0, 0.01)]
    assert methods["daft"]["selected"] == {"head_lr": 0.01, "backbone_lr": 0.001}


def test_comparisons_are_paired_over_seeds(run: tuple[dict, dict, str]) -> None:
    """DAFT - X per seed, mean and 95 % t-interval; the interval contains the mean and follows the diffs."""
    from scipy.stats import t

    parsed = run[1]
    assert parsed["settings"]["seeds"] == [0, 1, 2]
    comps = parsed["comparisons"]
    assert set(comps) == {f"daft - {m}" for m in ROWS - {"daft"}}
    daft = {r["seed"]: r["metrics"] for r in parsed["methods"]["daft"]["per_seed"]}
    ft = {r["seed"]: r["metrics"] for r in parsed["methods"]["ft"]["per_seed"]}
    c = comps["daft - ft"]["ood_mean"]
    expected = [daft[s]["acc.ood_mean"] - ft[s]["acc.ood_mean"] for s in (0, 1, 2)]
    assert c["diffs"] == pytest.approx(expected) and c["mean"] == pytest.approx(sum(expected) / 3)
    sd = float(__import__("numpy").std(expected, ddof=1))
    half = t.ppf(0.975, 2) * sd / 3**0.5
    assert c["ci95"] == pytest.approx([c["mean"] - half, c["mean"] + half])
    assert c["includes_zero"] == (c["ci95"][0] <= 0 <= c["ci95"][1])
    regime = parsed["regime"]
    lp, ftm = (parsed["methods"][m]["summary"]["acc.ood_mean"]["mean"] for m in ("lp", "ft"))
    assert regime["lp_beats_ft_ood"] == (lp > ftm)


def test_wise_ft_rows_pick_alpha_on_val(run: tuple[dict, dict, str]) -> None:
    for m in cm.FINETUNED:
        wise = run[1]["methods"][m + cm.WISE]
        for rec in wise["per_seed"]:
            best = max(p["val_accuracy"] for p in rec["alpha_curve"])
            first = next(p["alpha"] for p in rec["alpha_curve"] if p["val_accuracy"] == best)
            assert rec["alpha"] == first  # ties: the smaller alpha
            assert 0.0 <= rec["alpha"] <= 1.0


def test_unpublished_lrs_need_a_variant_name() -> None:
    argv = ["--preset", "digits", "--model", "tiny_cnn", "--weights", "none", "--input-size", "16",
            "--max-train", "32", "--epochs", "1", "--seeds", "1", "--methods", "daft", "--no-wise-ft",
            "--lr", "daft=0.01:0.01"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"much faster.*--variant daft=NAME"):
        cm.main(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        res = cm.main([*argv, "--variant", "daft=equal-lrs"])
    assert res["methods"]["daft"]["variant"] == "equal-lrs"


def test_outputs_written(run: tuple[dict, dict, str]) -> None:
    prefix = pathlib.Path(run[2])
    data = json.loads(prefix.with_name(prefix.name + ".json").read_text())
    assert set(data["methods"]) == ROWS
    md = prefix.with_name(prefix.name + ".md").read_text()
    assert "| daft |" in md and "Learning-rate selection" in md
    assert "| daft - ft | 3 |" in md and "## Regime" in md


def test_select_ignores_diverged_and_prefers_earliest() -> None:
    recs = [{"val_accuracy": None}, {"val_accuracy": 0.5}, {"val_accuracy": 0.7}, {"val_accuracy": 0.7}]
    assert cm._select(recs) == 2
    with pytest.raises(ValueError, match="diverged"):
        cm._select([{"val_accuracy": None}])


def test_grid_parsing() -> None:
    assert cm._method_map(["daft=0.01:0.001"], "--grid") == {"daft": [(0.01, 0.001)]}
    with pytest.raises(SystemExit):
        cm._method_map(["nope=0.1"], "--grid")

"""Step 7: one table and plots across methods; the `champion` alias goes to the best method by ID val."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common import (
    StepError,
    Timer,
    base_parser,
    cli,
    params_from_args,
    read_json,
    tracked,
    write_json,
)
from components.outputs import check_output_dir, check_outputs, write_marker
from components.params import Params
from daft_core.atomic import atomic_dir
from daft_core.methods import alias_for, display_order
from daft_core.selection import select_best

log = logging.getLogger(__name__)

PLOTS = ("id_vs_ood.png", "ood_accuracy.png", "distortion.png")
REPORT_FILES = ("table.md", "summary.json", "accuracy.json", *PLOTS)  # what run() writes into --out


def collect(metrics_dir: str | Path) -> list[dict[str, Any]]:
    files = sorted(p for p in Path(metrics_dir).glob("*.json") if not p.name.endswith(".details.json"))
    if not files:
        raise StepError(f"no per-method metrics in {metrics_dir}; run the evaluate stages first")
    rows = {r["method"]: r for r in (read_json(p) for p in files)}
    rank = {m: i for i, m in enumerate(display_order({_base(r) for r in rows.values()}))}
    return sorted(rows.values(), key=lambda r: (rank[_base(r)], bool(r.get("wise_ft")), r["method"]))


def _base(row: dict[str, Any]) -> str:
    """The catalogue method a row belongs to: a WiSE-FT row (components.wise_ft) sits after its method."""
    return (row.get("wise_ft") or {}).get("method") or row["method"]


def display_name(row: dict[str, Any]) -> str:
    """The row's name in the table: ``wise_ft[<method>] (α=0.3)`` for a WiSE-FT row, else the method."""
    wise = row.get("wise_ft") or {}
    if not wise:
        return row["method"]
    alpha = wise.get("alpha")
    return f"wise_ft[{wise.get('method')}]" + (f" (α={alpha:g})" if isinstance(alpha, int | float) else "")


def champion(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best by ID val only (the ID test set is never used for selection); ties go to the earlier method.

    WiSE-FT rows compete too; each follows its method, so a WiSE-FT mix that only ties its fine-tuned model
    (α = 1 is on its grid) leaves the champion with the method itself.
    """
    return select_best(rows)


def champion_version(
    params: Params,
    method: str,
    tracker: Any,
    unavailable: Mapping[str, str] | None = None,
    alias: str | None = None,
) -> tuple[str | None, str | None]:
    """(the registered version `method`'s alias points at, None) or (None, why not: the note to record).

    `unavailable`: method -> why its version is unknown (the sweep's selection could not move its alias),
    so a stale alias from an earlier run is not taken for the selected configuration. `alias`: the row's
    own alias when it is not a catalogue method's (a WiSE-FT row's ``wise-ft-<method alias>``).
    """
    from components import tracking
    from components.tracking.retries import redact_uri

    name, alias = params.pipeline.registered_model, alias or alias_for(method)
    if unavailable and method in unavailable:
        reason = unavailable[method]
    else:
        version = tracking.version_for_alias(name, alias, uri=tracker.uri)
        if version is not None:
            return version, None
        where = redact_uri(tracker.uri or tracking.tracking_uri())
        reason = f"alias {name}@{alias} is not set in the model registry at {where}"
    note = (
        f"`champion` alias not moved: no registered version of {method!r} ({reason}). Was its step tracked "
        "to another store (e.g. a pod's own sqlite)? Rerun it against this tracking server, then the report."
    )
    return None, note


def markdown_table(rows: list[dict[str, Any]], best: str) -> str:
    ood_names = list(rows[0]["ood"])
    head = ["method", "ID val", "ID test", *[f"OOD {n}" for n in ood_names], "OOD mean", "L2 ID", "L2 OOD"]
    head.append("ΔW backbone")  # relative L2 of the backbone's weights vs pretrained (head excluded)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = r.get("distortion") or {}
        cells = [
            display_name(r)
            + (f" (variant: {r['variant']}, not the published method)" if r.get("variant") else "")
            + (" (champion)" if r["method"] == best else ""),
            _pct(r["id_val_accuracy"]),
            _pct(r["id_test_accuracy"]),
            *[_pct(r["ood"].get(n)) for n in ood_names],
            _pct(r.get("ood_mean_accuracy")),
            _num(d.get("id_test_l2")),
            _num(d.get("ood_l2")),
            _sig((r.get("parameter_distance_total") or {}).get("relative")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _sig(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in rows]
    ood_names = list(rows[0]["ood"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.scatter(100 * r["id_test_accuracy"], 100 * (r["ood_mean_accuracy"] or 0), s=60)
        ax.annotate(r["method"], (100 * r["id_test_accuracy"], 100 * (r["ood_mean_accuracy"] or 0)))
    ax.set(xlabel="ID test accuracy (%)", ylabel="mean OOD accuracy (%)", title="ID vs OOD accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "id_vs_ood.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) * max(1, len(ood_names))), 4.5))
    width = 0.8 / (len(ood_names) + 1)
    for j, name in enumerate(["id_test", *ood_names]):
        vals = [100 * (r["id_test_accuracy"] if name == "id_test" else r["ood"][name]) for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], methods)
    ax.set(ylabel="accuracy (%)", title="Accuracy per set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ood_accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    id_l2 = [(r.get("distortion") or {}).get("id_test_l2") or 0 for r in rows]
    ood_l2 = [(r.get("distortion") or {}).get("ood_l2") or 0 for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], id_l2, 0.4, label="ID test")
    ax.bar([x + 0.2 for x in xs], ood_l2, 0.4, label="OOD")
    ax.set_xticks(list(xs), methods)
    ax.set(ylabel="mean L2 feature change vs pretrained", title="Feature distortion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "distortion.png", dpi=120)
    plt.close(fig)


def run(
    params: Params,
    metrics_dir: str | Path,
    out_dir: str | Path,
    *,
    unavailable: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Table, plots and summary.json in `out_dir`; the best method's registered version gets `champion`.

    With tracking on, summary.json records ``champion_version``: the version, or null with a
    ``champion_note`` saying why (also a WARNING) when the best method has no registered version (its alias
    is missing, or `unavailable` names it). Returns the summary plus the run's ``mlflow_run_id`` / ``_url``.
    """
    check_outputs("report", dirs=[out_dir], inputs=[metrics_dir], known=REPORT_FILES)
    timer = Timer()
    with tracked(params, "report", {}) as tracker:
        rows = collect(metrics_dir)
        best = champion(rows)
        table = markdown_table(rows, best["method"])
        summary = {
            "champion": best["method"],
            "champion_id_val_accuracy": best["id_val_accuracy"],
            "methods": {
                r["method"]: {
                    "id_val_accuracy": r["id_val_accuracy"],
                    "id_test_accuracy": r["id_test_accuracy"],
                    "ood_mean_accuracy": r.get("ood_mean_accuracy"),
                    **{f"ood_{k}": v for k, v in r["ood"].items()},
                    **({"wise_ft_alpha": r["wise_ft"].get("alpha")} if r.get("wise_ft") else {}),
                }
                for r in rows
            },
        }
        accuracy_points = [
            {
                "method": r["method"],
                "id_test_accuracy": r["id_test_accuracy"],
                "ood_accuracy": r.get("ood_mean_accuracy"),
            }
            for r in rows
        ]
        version = None
        if params.pipeline.tracking:
            alias = (best.get("wise_ft") or {}).get("alias")
            version, note = champion_version(params, best["method"], tracker, unavailable, alias=alias)
            summary["champion_version"] = version
            if note is not None:
                summary["champion_note"] = note
                log.warning("champion: %s", note)
        check_output_dir(out_dir, "report", known=REPORT_FILES)  # again, in case it changed meanwhile
        with atomic_dir(out_dir) as tmp:
            write_marker(tmp, "report")
            (tmp / "table.md").write_text(table)
            write_json(tmp / "summary.json", summary)
            write_json(tmp / "accuracy.json", accuracy_points)
            plot(rows, tmp)
        for png in PLOTS:
            tracker.log_artifact(str(Path(out_dir) / png))
        tracker.log_artifact(str(Path(out_dir) / "table.md"))
        if version is not None:
            name = params.pipeline.registered_model
            tracker.set_alias(name, "champion", version)
            log.info("champion: %s (version %s of %s)", best["method"], version, name)
        tracker.log_metrics({"champion_id_val_accuracy": best["id_val_accuracy"]})
        print(table)
        log.info("report written to %s in %.1fs", out_dir, timer.seconds)
        return {**summary, **tracker.run_info()}


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--metrics", required=True, help="directory of per-method metrics JSON files")
    p.add_argument("--out", required=True, help="report directory")
    args = p.parse_args(argv)
    run(params_from_args(args), args.metrics, args.out)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())

"""A run that is not the published method is named, and the name reaches the report."""

from __future__ import annotations

from components.report import markdown_table


def _row(method: str, variant: str | None = None) -> dict:
    row = {
        "method": method,
        "id_val_accuracy": 0.9,
        "id_test_accuracy": 0.8,
        "ood": {"printed": 0.7},
        "ood_mean_accuracy": 0.7,
        "distortion": {},
    }
    if variant:
        row["variant"] = variant
    return row


def test_report_marks_a_variant_row() -> None:
    table = markdown_table([_row("ft"), _row("daft", "equal-lrs")], best="ft")
    daft_line = next(line for line in table.splitlines() if line.startswith("| daft"))
    ft_line = next(line for line in table.splitlines() if line.startswith("| ft"))
    assert "variant: equal-lrs" in daft_line and "not the published method" in daft_line
    assert "variant" not in ft_line and "(champion)" in ft_line

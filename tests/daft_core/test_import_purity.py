"""daft_core is a pure library: importing all of it must not pull in MLflow, Kubeflow, DVC or a cloud SDK."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"mlflow", "kfp", "dvc", "boto3", "botocore", "s3transfer"}
CORE = Path(__file__).resolve().parents[2] / "daft_core"


def test_importing_daft_core_loads_no_pipeline_frameworks() -> None:
    code = (
        "import sys, daft_core, daft_core.data, daft_core.models, daft_core.training;"
        "import daft_core.models.checkpoint, daft_core.models.registry, daft_core.models.wrapper;"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(FORBIDDEN)!r}));"
        "print(','.join(bad))"
    )
    cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "", f"daft_core imported {res.stdout.strip()}"
    assert "convert_batchnorm" in dir(__import__("daft_core"))


def test_no_daft_core_source_imports_them_even_lazily() -> None:
    """The runtime check misses imports inside functions (e.g. an s3 download); this one reads the source."""
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(CORE.parent)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in FORBIDDEN
            ]
    assert not offenders, "daft_core must not import pipeline frameworks or cloud SDKs: " + ", ".join(
        offenders
    )

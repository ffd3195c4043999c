"""daft_core is a pure library: importing all of it must not pull in MLflow, Kubeflow or DVC."""

import subprocess
import sys


def test_importing_daft_core_loads_no_pipeline_frameworks() -> None:
    code = (
        "import sys, daft_core, daft_core.data, daft_core.models, daft_core.finetune;"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'kfp', 'dvc', 'boto3'});"
        "print(','.join(bad))"
    )
    cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip() == "", f"daft_core imported {res.stdout.strip()}"
    assert "convert_batchnorm" in dir(__import__("daft_core"))

"""The Kubeflow side of the DAFT pipeline.

``pipelines.components``  KFP v2 lightweight components; each body calls ``components.<step>.run``.
``pipelines.pipeline``    the ``@dsl.pipeline`` DAG (same shape as dvc.yaml) and the learning-rate sweep.
``pipelines.cli``         ``python -m pipelines compile | run-local | submit`` (also ``daft-pipelines``).

Nothing here is imported by ``components`` or ``daft_core`` (the arrows point one way).
"""

DEFAULT_IMAGE = "ghcr.io/daft-pipeline/daft-pipeline:0.1.0"

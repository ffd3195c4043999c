"""The Kubeflow side of the DAFT pipeline.

``pipelines.components``  KFP v2 lightweight components; each body calls ``components.<step>.run``.
``pipelines.pipeline``    the ``@dsl.pipeline`` DAG (same shape as dvc.yaml) and the learning-rate sweep.
``pipelines.cli``         ``python -m pipelines compile | run-local | submit`` (also ``daft-pipelines``).

Nothing here is imported by ``components`` or ``daft_core`` (the arrows point one way).
"""

IMAGE_REPOSITORY = "ghcr.io/daft-pipeline/daft-pipeline"
IMAGE_VERSION = "0.1.0"
# The Dockerfile's two builds: TORCH_VARIANT=cpu (the tag without a suffix) and TORCH_VARIANT=cuda (`-cuda`).
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_VERSION}"  # CPU torch: the default with --no-gpu
DEFAULT_CUDA_IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_VERSION}-cuda"  # CUDA torch: the default with GPUs on

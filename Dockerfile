# syntax=docker/dockerfile:1
# One image for every Kubeflow step: the project and its pinned dependencies (constraints.txt).
#
#   docker build -t REGISTRY/daft-pipeline:0.1.0 .                               # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cuda -t REGISTRY/daft-pipeline:0.1.0-cuda .   # CUDA torch
#
# The CUDA variant installs torch from PyPI, whose Linux wheels bundle the CUDA runtime (the nvidia-* pins
# in constraints.txt); the node needs only the NVIDIA driver. No credentials are baked in: S3 and MLflow
# credentials reach the pods as environment variables from Kubernetes secrets.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE}

# cpu | cuda
ARG TORCH_VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

# git: MLflow records the source version; tini: signal handling for the step process.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 daft \
    && useradd --uid 1000 --gid daft --create-home --home-dir /home/daft --shell /usr/sbin/nologin daft

WORKDIR /src

# Dependencies first (a layer that survives source edits): the same pinned command as README.md.
COPY pyproject.toml constraints.txt README.md ./
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install -c constraints.txt --index-url "$TORCH_CPU_INDEX" torch torchvision; \
    elif [ "$TORCH_VARIANT" != "cuda" ]; then \
        echo "TORCH_VARIANT must be cpu or cuda, got $TORCH_VARIANT" >&2; exit 1; \
    fi

COPY daft_core ./daft_core
COPY components ./components
COPY pipelines ./pipelines
COPY params.yaml dvc.yaml ./
# A regular (non-editable) install; the steps then run in an empty working directory, as a pod should:
# no repository, no params.yaml beside them (hidden shared-file assumptions fail here as in `run-local
# --isolated`). params.yaml stays in /src for `python -m pipelines compile --params /src/params.yaml`.
RUN pip install -c constraints.txt . \
    && mkdir -p /work && chown daft:daft /work \
    && cd /work && python -c "import daft_core, components, pipelines, kfp, kfp.kubernetes, mlflow"

USER daft
WORKDIR /work
ENV HOME=/home/daft \
    MPLCONFIGDIR=/home/daft/.cache/matplotlib \
    TORCH_HOME=/home/daft/.cache/torch

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "pipelines", "--help"]

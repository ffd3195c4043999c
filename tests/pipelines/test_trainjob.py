"""Distributed fine-tuning as a Kubeflow Trainer v2 TrainJob (pipelines/trainjob.py).

* the TrainJob spec for 2 nodes x 4 GPUs, field by field; bad settings are one clear ValueError;
* the launcher against a real HTTP server on loopback that serves the Kubernetes custom-objects endpoints
  (create / get / delete of trainjobs, with scripted status transitions), through the real ``kubernetes``
  client, and the moto S3 server for the inputs and the model: success (the node wrapper itself plays the
  job's node 0), failure (the job's message), timeout (the job deleted), a retried launcher;
* the compiled pipeline with ``finetune.launcher: trainjob`` has the launcher task instead of the in-pod
  finetune, and the option off changes nothing.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from components.params import load_params, params_from_dict
from pipelines import trainjob as tj
from pipelines.pipeline import DEFAULT_SECRETS, PipelineOptions, compile_pipeline
from pipelines.platform import PlatformError, validate_platform
from tests.tiny_params import tiny_params

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/ml/daft-pipeline:1.2.3-cuda"
PREFIX = "s3://team-results/daft/run-1/daft/h0.1-b0.001"
JOBS_PATH = f"/apis/{tj.GROUP}/{tj.VERSION}/namespaces/team-a/{tj.PLURAL}"


def _config(**kw: Any) -> tj.TrainJobConfig:
    base: dict[str, Any] = {
        "launcher": "trainjob",
        "nodes": 2,
        "gpus_per_node": 4,
        "results_uri": "s3://team-results/daft",
        "resources": {"cpu": "8", "memory": "32Gi", "memory_limit": "64Gi"},
        "env": {"NCCL_DEBUG": "INFO"},
        "secrets": DEFAULT_SECRETS,
    }
    return tj.TrainJobConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------------
# (1) the spec
# --------------------------------------------------------------------------------------------------


def test_spec_for_two_nodes_of_four_gpus() -> None:
    config = _config()
    command = tj.container_command(config, PREFIX, '{"finetune": {}}', "daft")
    spec = tj.trainjob_spec(
        config,
        name="daft-ft-daft-0123456789",
        namespace="team-a",
        image=IMAGE,
        command=command,
        env={"DAFT_PIPELINE_RUN_ID": "run-1", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        labels={"daft.pipeline/run-id": "run-1", "daft.pipeline/method": "lp_ft"},
    )
    assert spec["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert spec["kind"] == "TrainJob"
    assert spec["metadata"] == {
        "name": "daft-ft-daft-0123456789",
        "namespace": "team-a",
        "labels": {"daft.pipeline/method": "lp_ft", "daft.pipeline/run-id": "run-1"},
    }
    assert spec["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["spec"]["trainer"]
    assert trainer["numNodes"] == 2
    assert trainer["numProcPerNode"] == 4  # one process per GPU
    assert trainer["image"] == IMAGE
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "4"},
    }
    # Every node: the wrapper (stage in, node 0 uploads), then torchrun with the finetune CLI.
    cmd = trainer["command"]
    assert cmd[:4] == ["python", "-m", "pipelines.trainjob", "node"]
    wrapper = dict(zip(cmd[4:12:2], cmd[5:12:2], strict=True))
    assert wrapper == {
        "--data-uri": f"{PREFIX}/inputs/data",
        "--model-uri": f"{PREFIX}/inputs/model",
        "--out-uri": f"{PREFIX}/model",
        "--workdir": tj.JOB_WORKDIR,
    }
    torchrun = cmd[cmd.index("--") + 1 :]
    assert torchrun[:7] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "-m", "components.finetune"]
    args = dict(zip(torchrun[7::2], torchrun[8::2], strict=True))
    assert args == {
        "--params-json": '{"finetune": {}}',
        "--method": "daft",
        "--model": f"{tj.JOB_WORKDIR}/inputs/model",
        "--data": f"{tj.JOB_WORKDIR}/inputs/data",
        "--out": f"{tj.JOB_WORKDIR}/model",
        "--resume": "auto",
    }
    assert "--node-rank" not in torchrun and "--master-addr" not in torchrun  # PET_* from the Trainer
    env = {e["name"]: e for e in trainer["env"]}
    assert env["DAFT_PIPELINE_RUN_ID"] == {"name": "DAFT_PIPELINE_RUN_ID", "value": "run-1"}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert env["NCCL_DEBUG"]["value"] == "INFO"
    assert env["DAFT_EXPECT_GPU"]["value"] == "1"
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "daft-s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}},
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "daft-mlflow-credentials"
    assert len(env) == len(trainer["env"])  # each name once (the API keys env by name)
    json.dumps(spec)  # plain JSON, as the API server gets it


def test_a_secret_wins_over_a_plain_variable_and_cpu_jobs_ask_no_gpu() -> None:
    secrets = {"daft-s3-credentials": {"endpoint": "AWS_ENDPOINT_URL"}}
    config = _config(gpus_per_node=0, resources={}, env={}, secrets=secrets, secrets_optional=True)
    spec = tj.trainjob_spec(
        config, name="j", namespace="ns", image=IMAGE, command=["true"], env={"AWS_ENDPOINT_URL": "http://x"}
    )
    trainer = spec["spec"]["trainer"]
    assert trainer["env"] == [
        {
            "name": "AWS_ENDPOINT_URL",
            "valueFrom": {
                "secretKeyRef": {"name": "daft-s3-credentials", "key": "endpoint", "optional": True}
            },
        }
    ]
    assert "resourcesPerNode" not in trainer and trainer["numProcPerNode"] == 1


def test_job_name_is_stable_per_fine_tuning_and_a_valid_label() -> None:
    a = tj.job_name("3f2a-run", "lp_ft", "h0.1-b0.001")
    assert a == tj.job_name("3f2a-run", "lp_ft", "h0.1-b0.001")  # a retried launcher finds its job
    assert a != tj.job_name("3f2a-run", "lp_ft", "h0.01-b0.001")  # each sweep point its own
    assert a.startswith("daft-ft-lp-ft-") and len(a) <= 63
    assert len(tj.job_name("r", "m" * 200, "p")) <= 63


# --------------------------------------------------------------------------------------------------
# (2) bad settings
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"nodes": 0}, "finetune.nodes must be a whole number >= 1, got 0"),
        ({"nodes": True}, "finetune.nodes"),
        ({"gpus_per_node": -1}, "finetune.gpus_per_node must be a whole number >= 0, got -1"),
        ({"runtime": "Torch_Distributed"}, "finetune.runtime must be a Kubernetes name"),
        ({"namespace": "team a"}, "finetune.namespace must be a Kubernetes name"),
        ({"launcher": "mpi"}, "finetune.launcher must be pod or trainjob"),
        ({"results_uri": None}, "finetune.results_uri is not set"),
        ({"results_uri": "gs://b/p"}, "finetune.results_uri must be s3://bucket/prefix"),
        ({"resources": {"gpu": "4"}}, "finetune.resources: unknown key(s) ['gpu']"),
        ({"resources": {"cpu": "eight"}}, "finetune.resources.cpu must be a quantity"),
        ({"gpu_resource": "gpu"}, "finetune.gpu_resource must be an extended resource name"),
        ({"env": {"NCCL DEBUG": "INFO"}}, "'NCCL DEBUG' is not an environment variable name"),
        ({"image": "my image"}, "finetune.image must be an image reference"),
    ],
)
def test_bad_settings_are_one_clear_error(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as err:
        _config(**kw)
    assert needle in str(err.value)


def test_bad_job_names_and_the_platform_file() -> None:
    with pytest.raises(ValueError, match="TrainJob name must be a Kubernetes name"):
        tj.trainjob_spec(_config(), name="Daft_FT", namespace="ns", image=IMAGE, command=["x"])
    with pytest.raises(ValueError, match="must be a whole number >= 1"):
        tj.torchrun_command(2, 0, [])
    with pytest.raises(PlatformError, match=r"finetune\.nodes: .*greater than or equal to 1"):
        validate_platform({"finetune": {"launcher": "trainjob", "nodes": 0}}, "platform.yaml")
    with pytest.raises(PlatformError, match=r"finetune\.results_uri is not set"):
        validate_platform({"finetune": {"launcher": "trainjob", "nodes": 2}}, "platform.yaml")
    with pytest.raises(PlatformError, match=r"finetune\.gpus: unknown key.*gpus_per_node"):
        validate_platform({"finetune": {"gpus": 4}}, "platform.yaml")
    ok = validate_platform(
        {"finetune": {"launcher": "trainjob", "nodes": 2, "gpus_per_node": 4, "results_uri": "s3://b/p",
                      "timeout": "12h", "resources": {"cpu": 8}}},
        "platform.yaml",
    )  # fmt: skip
    assert ok["finetune"] == {
        "launcher": "trainjob",
        "nodes": 2,
        "gpus_per_node": 4,
        "results_uri": "s3://b/p",
        "timeout": 43200,
        "resources": {"cpu": "8"},
    }
    assert PipelineOptions(image=IMAGE, finetune=ok["finetune"]).trainjob().timeout == 43200


def test_a_cpu_image_for_gpu_nodes_is_refused() -> None:
    section = {"launcher": "trainjob", "results_uri": "s3://b/p", "image": "r.example.com/d:1-cpu"}
    with pytest.raises(ValueError, match="has CPU-only torch"):
        PipelineOptions(image=IMAGE, finetune=section)
    assert PipelineOptions(image=IMAGE, finetune={**section, "gpus_per_node": 0}).trainjob() is not None


# --------------------------------------------------------------------------------------------------
# (3) the launcher against a Kubernetes API on loopback, S3 on moto
# --------------------------------------------------------------------------------------------------


class FakeKube:
    """The custom-objects endpoints of one namespace's trainjobs: create (POST), get, delete.

    `statuses`: the status each successive GET shows (the last one sticks). `on_status` is called with the
    created object whenever a GET shows a status whose conditions say Complete (the job's node 0 uploads
    then, as on a cluster). `create_status`: answer POST with that HTTP status instead."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = [{}]
        self.requests: list[tuple[str, str]] = []
        self.on_complete: Any = None
        self.create_status: int | None = None
        self._gets = 0

    def handler(self) -> type[BaseHTTPRequestHandler]:
        kube = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code, {"kind": "Status", "status": "Failure", "reason": reason, "message": message}
                )

            def do_POST(self) -> None:
                kube.requests.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != JOBS_PATH:
                    return self._status(404, "NotFound", "the server could not find the requested resource")
                if kube.create_status:
                    return self._status(kube.create_status, "Forbidden", "trainjobs is forbidden: user x")
                name = body["metadata"]["name"]
                if name in kube.jobs:
                    return self._status(409, "AlreadyExists", f'trainjobs "{name}" already exists')
                kube.jobs[name] = body
                kube._gets = 0
                self._send(201, body)

            def do_GET(self) -> None:
                kube.requests.append(("GET", self.path))
                name = self.path.rsplit("/", 1)[-1]
                if self.path != f"{JOBS_PATH}/{name}" or name not in kube.jobs:
                    return self._status(404, "NotFound", f'trainjobs "{name}" not found')
                status = kube.statuses[min(kube._gets, len(kube.statuses) - 1)]
                kube._gets += 1
                obj = {**kube.jobs[name], "status": status}
                if tj.job_outcome(obj)[0] == "succeeded" and kube.on_complete is not None:
                    kube.on_complete(kube.jobs[name])
                    kube.on_complete = None
                self._send(200, obj)

            def do_DELETE(self) -> None:
                kube.requests.append(("DELETE", self.path))
                name = urlsplit(self.path).path.rsplit("/", 1)[-1]
                if kube.jobs.pop(name, None) is None:
                    return self._status(404, "NotFound", f'trainjobs "{name}" not found')
                self._send(200, {"kind": "Status", "status": "Success"})

        return Handler


@pytest.fixture
def kube() -> Iterator[tuple[FakeKube, Any]]:
    """A FakeKube on 127.0.0.1 and a real kubernetes ApiClient pointed at it."""
    from kubernetes import client

    fake = FakeKube()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conf = client.Configuration()
    conf.host = f"http://127.0.0.1:{server.server_address[1]}"
    api_client = client.ApiClient(conf)
    try:
        yield fake, api_client
    finally:
        api_client.close()
        server.shutdown()
        server.server_close()


def condition(kind: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


RUNNING = {"conditions": [condition("Suspended", "False", "Resumed")]}
COMPLETE = {"conditions": [condition("Complete", message="jobset completed")]}
FAILED = {
    "conditions": [condition("Failed", reason="JobSetFailed", message="jobset failed: node-0-1 exit code 2")]
}

# The job's training command as node 0 would run it, minus torchrun: reads the staged inputs, writes a model.
FAKE_TRAINING = """
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
data = (work / "inputs" / "data" / "bundle.txt").read_text()
start = (work / "inputs" / "model" / "model.pt").read_bytes()
out = work / "model"
out.mkdir()
(out / "model.pt").write_bytes(start + b"+trained")
(out / "summary.json").write_text(json.dumps({"method": "daft", "best_epoch": 2, "best_val_accuracy": 0.75,
                                              "epochs": 3, "data": data}))
(out / "history.json").write_text("[]")
"""


def _node_zero(workdir: Path, code: str = FAKE_TRAINING):
    """on_complete: run the node wrapper (real stage-in and upload) with FAKE_TRAINING for torchrun."""

    def run(job: dict[str, Any]) -> None:
        cmd = job["spec"]["trainer"]["command"]
        flags = dict(zip(cmd[4:12:2], cmd[5:12:2], strict=True))
        assert (
            tj.run_node(
                flags["--data-uri"],
                flags["--model-uri"],
                flags["--out-uri"],
                workdir,
                [sys.executable, "-c", code, str(workdir)],
            )
            == 0
        )

    return run


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    data, start = tmp_path / "dataset", tmp_path / "start"
    (data / "sub").mkdir(parents=True)
    (data / "bundle.txt").write_text("digits")
    (data / "sub" / "manifest.json").write_text("{}")
    start.mkdir()
    (start / "model.pt").write_bytes(b"weights")
    return data, start


def _launch(tmp_path: Path, api_client: Any, s3: Any, **kw: Any) -> dict[str, Any]:
    params = params_from_dict(tiny_params(), "test")
    data, start = _inputs(tmp_path)
    config = _config(results_uri=f"s3://{s3.bucket}/trainjob", namespace="team-a", poll_interval=1, **kw)
    return tj.run_launcher(
        config, params, "daft", str(data), str(start), str(tmp_path / "out" / "model"), "http://mlflow:5000",
        image=IMAGE, api_client=api_client, run_id="run-1", sleep=lambda _s: None,
    )  # fmt: skip


def test_launcher_success_stages_inputs_waits_and_fetches_the_model(tmp_path, kube, s3) -> None:
    fake, api_client = kube
    fake.statuses = [{}, RUNNING, RUNNING, COMPLETE]
    fake.on_complete = _node_zero(tmp_path / "node0")
    summary = _launch(tmp_path, api_client, s3)

    model = tmp_path / "out" / "model"
    assert (model / "model.pt").read_bytes() == b"weights+trained"  # node 0 trained on the staged start
    assert json.loads((model / "summary.json").read_text())["data"] == "digits"  # ... and the staged data
    assert sorted(p.name for p in model.iterdir()) == ["history.json", "model.pt", "summary.json"]
    assert summary["best_val_accuracy"] == 0.75 and summary["best_epoch"] == 2 and summary["epochs"] == 3
    assert summary["head_lr"] == 0.1 and summary["backbone_lr"] == 0.001
    assert summary["registered_version"] is None  # tracking off in the tiny params
    name = tj.job_name("run-1", "daft", "h0.1-b0.001")
    assert summary["trainjob"] == f"team-a/{name}"
    prefix = "trainjob/run-1/daft/h0.1-b0.001"
    assert summary["results_prefix"] == f"s3://{s3.bucket}/{prefix}"
    assert set(s3.keys(prefix)) >= {
        f"{prefix}/inputs/data/bundle.txt",
        f"{prefix}/inputs/data/sub/manifest.json",
        f"{prefix}/inputs/model/model.pt",
        f"{prefix}/model/model.pt",
        f"{prefix}/model/{tj.COMPLETE_MARKER}",
    }
    created = fake.jobs[name]
    env = {e["name"]: e.get("value") for e in created["spec"]["trainer"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert created["metadata"]["labels"]["daft.pipeline/run-id"] == "run-1"
    assert [m for m, _ in fake.requests].count("GET") == 4  # polled until Complete
    assert "DELETE" not in [m for m, _ in fake.requests]


def test_launcher_failure_raises_with_the_jobs_message(tmp_path, kube, s3) -> None:
    fake, api_client = kube
    fake.statuses = [RUNNING, FAILED]
    with pytest.raises(tj.TrainJobFailed) as err:
        _launch(tmp_path, api_client, s3)
    text = str(err.value)
    assert "failed: JobSetFailed: jobset failed: node-0-1 exit code 2" in text
    assert "team-a/daft-ft-daft-" in text and "kubectl -n team-a logs" in text
    assert not (tmp_path / "out" / "model").exists()  # no output from a failed job


def test_wait_times_out_and_deletes_the_job(kube) -> None:
    fake, api_client = kube
    fake.statuses = [RUNNING]
    api = tj._api(api_client)
    spec = tj.trainjob_spec(_config(), name="daft-ft-x", namespace="team-a", image=IMAGE, command=["x"])
    tj.create_or_attach(api, spec)
    with pytest.raises(tj.TrainJobTimeout) as err:
        tj.wait_for_job(api, "daft-ft-x", "team-a", timeout=0.3, poll=0.05)
    assert "reached no verdict within 0.3 s (last: Suspended=False)" in str(err.value)
    assert "it was deleted" in str(err.value)
    # deleted with its pods (background propagation)
    assert ("DELETE", f"{JOBS_PATH}/daft-ft-x?propagationPolicy=Background") in fake.requests
    assert "daft-ft-x" not in fake.jobs


def test_a_retried_launcher_attaches_to_a_running_job_and_replaces_a_failed_one(kube) -> None:
    fake, api_client = kube
    api = tj._api(api_client)
    spec = tj.trainjob_spec(_config(), name="daft-ft-y", namespace="team-a", image=IMAGE, command=["x"])
    tj.create_or_attach(api, spec)
    fake.statuses = [RUNNING]
    tj.create_or_attach(api, spec)  # 409: attach, no second job, no delete
    assert [m for m, _ in fake.requests] == ["POST", "POST", "GET"]
    fake.requests.clear()
    fake.statuses = [FAILED]
    fake._gets = 0
    tj.create_or_attach(api, spec)  # 409, failed: delete and create again
    assert [m for m, _ in fake.requests] == ["POST", "GET", "DELETE", "POST"]
    assert "daft-ft-y" in fake.jobs


def test_forbidden_names_the_missing_rbac(kube) -> None:
    fake, api_client = kube
    fake.create_status = 403
    api = tj._api(api_client)
    spec = tj.trainjob_spec(_config(), name="daft-ft-z", namespace="team-a", image=IMAGE, command=["x"])
    with pytest.raises(tj.TrainJobError) as err:
        tj.create_or_attach(api, spec)
    assert "HTTP 403" in str(err.value) and "trainjobs is forbidden: user x" in str(err.value)
    assert "Role and RoleBinding of docs/kubeflow.md" in str(err.value)


def test_node_wrapper_uploads_only_from_node_zero_and_only_on_success(tmp_path, s3, monkeypatch) -> None:
    data, start = _inputs(tmp_path)
    base = f"s3://{s3.bucket}/node-test"
    tj.put_tree(data, f"{base}/inputs/data")
    tj.put_tree(start, f"{base}/inputs/model")
    args = (f"{base}/inputs/data", f"{base}/inputs/model", f"{base}/model")
    fail = [sys.executable, "-c", "raise SystemExit(3)"]
    assert tj.run_node(*args, tmp_path / "w0", fail) == 3
    monkeypatch.setenv("PET_NODE_RANK", "1")
    assert (
        tj.run_node(*args, tmp_path / "w1", [sys.executable, "-c", FAKE_TRAINING, str(tmp_path / "w1")]) == 0
    )
    assert not s3.keys("node-test/model")  # neither a failed node 0 nor node 1 uploads
    with pytest.raises(tj.TrainJobError, match=r"no _DAFT_COMPLETE\.json"):
        tj.fetch_complete_tree(f"{base}/model", tmp_path / "fetched")


# --------------------------------------------------------------------------------------------------
# (4) the compiled pipeline
# --------------------------------------------------------------------------------------------------

SECTION = {"launcher": "trainjob", "nodes": 2, "gpus_per_node": 4, "results_uri": "s3://team-results/daft"}


def _compile(tmp_path: Path, name: str, **opts: Any) -> tuple[str, dict, dict]:
    out = tmp_path / name
    compile_pipeline(load_params(ROOT / "params.yaml"), PipelineOptions(image=IMAGE, **opts), str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    return out.read_text(), docs[0], docs[1] if len(docs) > 1 else {}


def test_pipeline_with_the_trainjob_launcher(tmp_path: Path) -> None:
    _, spec, platform = _compile(tmp_path, "tj.yaml", finetune=SECTION)
    tasks = {t["taskInfo"]["name"]: t for t in spec["root"]["dag"]["tasks"].values()}
    methods = load_params(ROOT / "params.yaml").finetune.methods
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert not any(name.startswith("comp-finetune") and "trainjob" not in name for name in spec["components"])
    for method in methods:
        task = tasks[f"finetune-{method}"]
        comp = spec["components"][task["componentRef"]["name"]]
        label = comp["executorLabel"]
        container = executors[label]["container"]
        assert "finetune_trainjob" in " ".join(container["command"])
        assert "accelerator" not in container.get("resources", {})  # the nodes have the GPUs, not it
        assert container["resources"]["resourceMemoryLimit"] == "2Gi"
        config = json.loads(task["inputs"]["parameters"]["trainjob_json"]["runtimeValue"]["constant"])
        assert (config["nodes"], config["gpus_per_node"], config["image"]) == (2, 4, IMAGE)
        assert config["secrets"] == DEFAULT_SECRETS
        env = {e["name"]: e["fieldPath"] for e in k8s[label]["fieldPathAsEnv"]}
        assert env[tj.NAMESPACE_ENV] == "metadata.namespace"
        assert {s["secretName"] for s in k8s[label]["secretAsEnv"]} == set(DEFAULT_SECRETS)
        # evaluate reads the launcher's model, as it read the in-pod finetune's
        keys = {t["taskInfo"]["name"]: k for k, t in spec["root"]["dag"]["tasks"].items()}
        ev = tasks[f"evaluate-{method}"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
        assert ev == {"outputArtifactKey": "model", "producerTask": keys[f"finetune-{method}"]}


def test_option_off_or_local_keeps_the_in_pod_finetune(tmp_path: Path) -> None:
    plain, _, _ = _compile(tmp_path, "plain.yaml")
    pod, _, _ = _compile(tmp_path, "pod.yaml", finetune={"launcher": "pod", "nodes": 3})
    assert pod == plain  # off: byte for byte the pipeline it was
    assert "finetune_trainjob" not in plain
    # run-local (kfp.local) cannot create cluster objects: it fine-tunes in its subprocess
    assert PipelineOptions(image=IMAGE, finetune=SECTION, local=True).trainjob() is None

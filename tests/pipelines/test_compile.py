"""Compile the Kubeflow pipeline and assert on the IR (PipelineSpec + Kubernetes platform spec)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.params import load_params
from daft_core.methods import METHODS as CATALOGUE
from pipelines.cli import main as cli_main
from pipelines.pipeline import DEFAULT_SECRETS, PipelineOptions, build_pipeline, compile_pipeline

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/ml/daft-pipeline:1.2.3"
METHODS = ("ft", "lp_ft", "daft")
STEP_TASKS = {"prepare-data", "pretrained", "convert-bn", "linear-probe"}


def _compile(tmp_path: Path, name: str = "p.yaml", **opts: Any) -> tuple[dict, dict, Path]:
    params = load_params(ROOT / "params.yaml")
    out = tmp_path / name
    compile_pipeline(params, PipelineOptions(image=IMAGE, **opts), str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    spec = docs[0]
    platform = docs[1] if len(docs) > 1 else {}
    return spec, platform, out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    return _compile(tmp_path_factory.mktemp("compile"))


def by_display_name(dag: dict) -> dict[str, tuple[str, dict]]:
    """taskInfo.name (set_display_name) -> (task key in the IR, task spec)."""
    return {t["taskInfo"]["name"]: (key, t) for key, t in dag["tasks"].items()}


def executor_of(spec: dict, task: dict) -> dict:
    comp = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]


def test_tasks_and_dependencies_mirror_dvc_yaml(compiled) -> None:
    spec, _, _ = compiled
    tasks = by_display_name(spec["root"]["dag"])
    expected = (
        {"resolve-params", "evaluate-lp", "report"}
        | STEP_TASKS
        | {f"finetune-{m}" for m in METHODS}
        | {f"evaluate-{m}" for m in METHODS}
    )
    assert set(tasks) == expected

    def producer(display: str, artifact: str) -> str:
        _key, t = tasks[display]
        src = t["inputs"]["artifacts"][artifact]["taskOutputArtifact"]
        return next(n for n, (k, _) in tasks.items() if k == src["producerTask"])

    # Each branch starts where dvc.yaml's `start` says.
    assert producer("finetune-ft", "start") == "pretrained"
    assert producer("finetune-lp_ft", "start") == "linear-probe"
    assert producer("finetune-daft", "start") == "convert-bn"
    assert producer("convert-bn", "pretrained") == "pretrained"
    assert producer("linear-probe", "pretrained") == "pretrained"
    assert producer("evaluate-lp", "model") == "linear-probe"
    for m in METHODS:
        assert producer(f"evaluate-{m}", "model") == f"finetune-{m}"
        assert producer(f"evaluate-{m}", "reference") == "pretrained"
        assert producer("report", m) == f"evaluate-{m}"
    assert producer("report", "lp") == "evaluate-lp"
    # Methods are parallel branches: no finetune depends on another finetune.
    keys = {n: k for n, (k, _) in tasks.items()}
    for m in METHODS:
        deps = set(tasks[f"finetune-{m}"][1]["dependentTasks"])
        assert not deps & {keys[f"finetune-{o}"] for o in METHODS}
    report_deps = set(tasks["report"][1]["dependentTasks"])
    assert {keys[f"evaluate-{m}"] for m in (*METHODS, "lp")} <= report_deps
    # Every step reads its own slice of the resolved params tree; the KFP run id is no input (cache key).
    for name, (_, t) in tasks.items():
        if name == "resolve-params":
            continue
        p = t["inputs"]["parameters"]
        assert p["params_json"]["taskOutputParameter"]["producerTask"] == keys["resolve-params"]
        step = name.split("-")[0] if name.startswith(("finetune-", "evaluate-")) else name.replace("-", "_")
        assert p["params_json"]["taskOutputParameter"]["outputParameterKey"] == step
        assert "pipeline_run_id" not in p
        assert p["tracking_uri"]["componentInputParameter"] == "tracking_uri"


def test_artifact_types(compiled) -> None:
    spec, _, _ = compiled
    comps = spec["components"]

    def out_type(comp: str, name: str) -> str:
        return comps[comp]["outputDefinitions"]["artifacts"][name]["artifactType"]["schemaTitle"]

    def in_type(comp: str, name: str) -> str:
        return comps[comp]["inputDefinitions"]["artifacts"][name]["artifactType"]["schemaTitle"]

    assert out_type("comp-prepare-data", "dataset") == "system.Dataset"
    for comp in ("comp-pretrained", "comp-convert-bn", "comp-linear-probe", "comp-finetune"):
        assert out_type(comp, "model") == "system.Model"
        assert out_type(comp, "metrics") == "system.Metrics"
        assert in_type(comp, "dataset") == "system.Dataset"
    assert in_type("comp-finetune", "start") == "system.Model"
    assert in_type("comp-evaluate", "model") == "system.Model"
    assert out_type("comp-evaluate", "metrics") == "system.Metrics"
    assert out_type("comp-report", "metrics") == "system.Metrics"
    assert spec["root"]["outputDefinitions"]["artifacts"]["Output"]["artifactType"]["schemaTitle"] == (
        "system.Artifact"
    )


def test_executors_use_project_image_and_call_the_step(compiled) -> None:
    spec, _, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert executors
    for label, ex in executors.items():
        c = ex["container"]
        assert c["image"] == IMAGE
        source = "\n".join(c["command"])
        assert "pip install" not in source, f"{label} installs kfp at run time"
        assert "kfp.dsl.executor_main" in source
    for step in ("prepare_data", "pretrained", "convert_bn", "linear_probe", "finetune", "evaluate"):
        src = "\n".join(executors[f"exec-{step.replace('_', '-')}"]["container"]["command"])
        assert f"from components import {step} as step" in src
        assert "step.run(" in src
        assert f'step_setup("{step}", params_json, tracking_uri' in src
    report_src = "\n".join(executors["exec-report"]["container"]["command"])
    assert "finish_report(" in report_src  # selection + components.report.run (assemble_report)


def test_resources_and_gpus(compiled) -> None:
    spec, _, _ = compiled
    tasks = by_display_name(spec["root"]["dag"])
    for name, (_, t) in tasks.items():
        res = executor_of(spec, t).get("resources", {})
        assert res.get("resourceCpuRequest") and res.get("resourceMemoryRequest"), name
        assert res.get("resourceCpuLimit") and res.get("resourceMemoryLimit"), name
        gpu = name.startswith("finetune-") or name == "linear-probe"
        assert ("accelerator" in res) == gpu, name
        if gpu:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert res["accelerator"]["resourceCount"] == "1"
    ft = executor_of(spec, tasks["finetune-daft"][1])["resources"]
    assert ft["resourceCpuRequest"] == "4" and ft["resourceMemoryRequest"] == "8Gi"
    assert executor_of(spec, tasks["resolve-params"][1])["resources"]["resourceCpuRequest"] == "100m"


def test_no_gpu_and_custom_gpu(tmp_path: Path) -> None:
    spec, _, _ = _compile(tmp_path, "cpu.yaml", gpu=False)
    for ex in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in ex["container"].get("resources", {})
    spec, platform, _ = _compile(
        tmp_path, "t4.yaml", gpu_type="NVIDIA_TESLA_T4", gpu_count=2, gpu_node_selector={"pool": "gpu"}
    )
    acc = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]["accelerator"]
    assert acc["resourceType"] == "NVIDIA_TESLA_T4" and acc["resourceCount"] == "2"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-finetune"]["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert "nodeSelector" not in k8s["exec-prepare-data"]


def test_retries_and_caching(compiled, tmp_path: Path) -> None:
    spec, _, _ = compiled
    for key, t in spec["root"]["dag"]["tasks"].items():
        assert t["cachingOptions"] == {"enableCache": True}, key
        assert t["retryPolicy"] == {
            "maxRetryCount": 2,
            "backoffDuration": "30s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "600s",
        }, key
    spec, _, _ = _compile(tmp_path, "nocache.yaml", caching=False, retries=0)
    for key, t in spec["root"]["dag"]["tasks"].items():
        assert not t["cachingOptions"].get("enableCache", False), key
        assert "retryPolicy" not in t, key


def test_secrets_from_kubernetes_never_parameters(compiled) -> None:
    spec, platform, _path = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for label in spec["deploymentSpec"]["executors"]:
        if label == "exec-resolve-params":
            assert "secretAsEnv" not in k8s.get(label, {})
            continue
        got = {
            s["secretName"]: {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]}
            for s in k8s[label]["secretAsEnv"]
        }
        assert got == DEFAULT_SECRETS, label
    assert DEFAULT_SECRETS["daft-s3-credentials"] == {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    }
    assert set(DEFAULT_SECRETS["daft-mlflow-credentials"].values()) == {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
    names = set(spec["root"]["inputDefinitions"]["parameters"])
    assert not {n for n in names if re.search(r"secret|password|token|key", n, re.I)}
    # No env var of any executor carries a credential value.
    for ex in spec["deploymentSpec"]["executors"].values():
        for env in ex["container"].get("env", []):
            assert not re.search(r"SECRET|PASSWORD|TOKEN", env["name"])


def test_pipeline_parameters_default_to_params_yaml(compiled) -> None:
    spec, _, _ = compiled
    params = load_params(ROOT / "params.yaml")
    defs = spec["root"]["inputDefinitions"]["parameters"]
    default = {k: v.get("defaultValue") for k, v in defs.items()}
    assert json.loads(default["params_json"]) == params.model_dump(mode="json")
    assert default["epochs"] == params.finetune.epochs
    assert default["seed"] == params.finetune.seed
    assert default["experiment"] == params.pipeline.experiment
    assert default["registered_model"] == params.pipeline.registered_model
    assert default["tracking"] is params.pipeline.tracking
    assert default["tracking_uri"] == ""
    # One static `learning_rates` parameter: method -> the lr fields params.yaml sets for it.
    lrs = default["learning_rates"]
    assert set(lrs) == set(params.finetune.methods)
    for method, m in params.finetune.methods.items():
        for attr in ("lr", "head_lr", "backbone_lr"):
            if getattr(m, attr) is not None:
                assert lrs[method][attr] == pytest.approx(getattr(m, attr))
            else:
                assert attr not in lrs[method]
    assert defs["learning_rates"]["parameterType"] == "STRUCT"
    assert defs["epochs"]["parameterType"] == "NUMBER_INTEGER"
    assert defs["tracking"]["parameterType"] == "BOOLEAN"


def test_compile_is_deterministic_and_loads_back(tmp_path: Path, capsys) -> None:
    from kfp import components

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for out in (a, b):
        assert (
            cli_main(["compile", "--params", str(ROOT / "params.yaml"), "--image", IMAGE, "-o", str(out)])
            == 0
        )
    assert a.read_bytes() == b.read_bytes()
    loaded = components.load_component_from_file(str(a))
    assert loaded.name == "daft"
    assert set(loaded.component_spec.inputs) >= {"params_json", "epochs", "tracking_uri"}
    assert "compiled pipeline" in capsys.readouterr().out


def test_sweep_pipeline_parallel_for_and_collected(tmp_path: Path) -> None:
    spec, _, _ = _compile(tmp_path, "sweep.yaml", sweep=True, sweep_parallelism=3)
    assert spec["pipelineInfo"]["name"] == "daft-sweep"
    defs = spec["root"]["inputDefinitions"]["parameters"]
    # The default grids are the method catalogue's (daft_core.methods), the one source of sweep grids.
    grid = defs["daft_grid"]["defaultValue"]
    assert grid == [{"head_lr": h, "backbone_lr": b} for h, b in CATALOGUE["daft"].grid]
    assert defs["ft_lrs"]["defaultValue"] == CATALOGUE["ft"].lr_list()
    assert "learning_rates" not in defs  # a sweep point sets a method's lrs
    assert defs["lp_ft_lrs"]["parameterType"] == "LIST"
    tasks = spec["root"]["dag"]["tasks"]
    loops = {k: t for k, t in tasks.items() if "parameterIterator" in t}
    assert len(loops) == 3
    iterated = {t["parameterIterator"]["items"]["inputParameter"] for t in loops.values()}
    assert iterated == {"pipelinechannel--ft_lrs", "pipelinechannel--lp_ft_lrs", "pipelinechannel--daft_grid"}
    for t in loops.values():
        assert t["iteratorPolicy"]["parallelismLimit"] == 3
    # Inside the daft loop: head_lr / backbone_lr from the loop item, finetune then evaluate.
    daft_loop = next(
        t for t in loops.values() if "daft_grid" in t["parameterIterator"]["items"]["inputParameter"]
    )
    body = spec["components"][daft_loop["componentRef"]["name"]]["dag"]["tasks"]
    ft = next(t for t in body.values() if t["taskInfo"]["name"] == "finetune-daft")
    for field in ("head_lr", "backbone_lr"):
        src = ft["inputs"]["parameters"][field]
        assert src["componentInputParameter"] == "pipelinechannel--daft_grid-loop-item"
        assert src["parameterExpressionSelector"] == f'parseJson(string_value)["{field}"]'
    assert {t["taskInfo"]["name"] for t in body.values()} == {"finetune-daft", "evaluate-daft"}
    # Inside the loop the resolved params come as resolve_params' JSON artifact (not a task output parameter).
    assert "params_file" in ft["inputs"]["artifacts"] and "params_json" not in ft["inputs"]["parameters"]
    # The collected evaluations feed select_best, which depends on every loop.
    select = next(t for t in tasks.values() if t["taskInfo"]["name"] == "select-best")
    for m in METHODS:
        src = select["inputs"]["artifacts"][m]["taskOutputArtifact"]
        assert src["producerTask"] in loops
    assert set(loops) <= set(select["dependentTasks"])
    sel_inputs = spec["components"]["comp-select-best"]["inputDefinitions"]["artifacts"]
    assert sel_inputs["daft"]["isArtifactList"] is True


def test_local_build_leaves_out_platform_settings(tmp_path: Path) -> None:
    from kfp import compiler

    params = load_params(ROOT / "params.yaml")
    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(params, PipelineOptions(local=True)), str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 1  # no Kubernetes platform spec (secrets, node selectors)
    for ex in docs[0]["deploymentSpec"]["executors"].values():
        assert "resources" not in ex["container"]
    for t in docs[0]["root"]["dag"]["tasks"].values():
        assert "retryPolicy" in t and t["cachingOptions"]["enableCache"] is True


def test_cli_platform_file_and_bad_input(tmp_path: Path, capsys) -> None:
    platform = tmp_path / "platform.yaml"
    platform.write_text(
        yaml.safe_dump(
            {
                "resources": {"finetune": {"cpu": "6", "memory": "12Gi"}},
                "gpu": {"type": "nvidia.com/gpu", "count": 1, "steps": ["finetune"]},
                "secrets": {"my-s3": {"access": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY"}},
                "retries": {"count": 4, "backoff": "10s"},
            }
        )
    )
    out = tmp_path / "p.yaml"
    argv = ["compile", "--params", str(ROOT / "params.yaml"), "--platform", str(platform), "-o", str(out)]
    assert cli_main(argv) == 0
    spec, platform_spec = list(yaml.safe_load_all(out.read_text()))
    res = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]
    assert res["resourceCpuRequest"] == "6" and res["resourceMemoryRequest"] == "12Gi"
    assert (
        "accelerator"
        not in spec["deploymentSpec"]["executors"]["exec-linear-probe"]["container"]["resources"]
    )
    secrets = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-finetune"][
        "secretAsEnv"
    ]
    assert [s["secretName"] for s in secrets] == ["my-s3"]
    assert next(iter(spec["root"]["dag"]["tasks"].values()))["retryPolicy"]["maxRetryCount"] == 4

    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: {finetune: {cpus: '2'}}\n")
    assert (
        cli_main(["compile", "--params", str(ROOT / "params.yaml"), "--platform", str(bad), "-o", str(out)])
        == 2
    )
    assert "unknown key" in capsys.readouterr().err
    assert cli_main(["compile", "--params", str(tmp_path / "missing.yaml"), "-o", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "uri",
    [
        "http://user:s3cret@mlflow.mlflow.svc:5000",
        "https://mlflow.example.com/?token=s3cret",
        "http://s3cret@mlflow:5000",
    ],
)
def test_compile_refuses_credentials_in_the_tracking_uri(tmp_path: Path, capsys, uri: str) -> None:
    """A URI with credentials would sit in plain text in the YAML: refused, pointing at the secret."""
    out = tmp_path / "p.yaml"
    argv = ["compile", "--params", str(ROOT / "params.yaml"), "--tracking-uri", uri, "-o", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "daft-mlflow-credentials" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert "s3cret" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The image: what can be checked without a Docker engine
# --------------------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_pinned_install_nonroot_no_secrets() -> None:
    text = _dockerfile()
    assert re.search(r"pip install [^\n]*-c constraints\.txt", text), (
        "install must use the pinned constraints"
    )
    assert "COPY constraints.txt" in text or "COPY pyproject.toml constraints.txt" in text
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    for line in text.splitlines():
        if re.match(r"^\s*(ENV|ARG)\b", line):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", line, re.I), line
    # The Python the image installs is the one the pins were resolved for.
    assert "python:3.11" in text


def test_dockerignore_keeps_context_small_and_secret_free() -> None:
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()}
    for pattern in (
        ".git",
        ".venv",
        "mlflow.db",
        "mlruns",
        "mlartifacts",
        "data",
        "models",
        ".env",
        "kfp_local",
    ):
        assert any(p.strip("/*").startswith(pattern.strip("/")) for p in lines), pattern
    # What the build needs is not ignored.
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "daft_core", "components", "pipelines"):
        assert needed not in lines


def test_every_dependency_is_pinned_in_constraints() -> None:
    """`pip install -c constraints.txt .` (the image) resolves every dependency to one pinned version."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs pin {pins[name]}"
    packages = project and tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pipelines*" in packages["packages"]["find"]["include"]


def test_report_inputs_cover_the_catalogue() -> None:
    """KFP has no variadic artifact inputs, so report/select_best name one input per catalogue method."""
    import inspect

    from daft_core.methods import FINETUNED_METHODS, METHOD_ORDER
    from pipelines import components as comps

    assert set(inspect.signature(comps.report).parameters) >= set(METHOD_ORDER)
    assert set(inspect.signature(comps.select_best).parameters) >= set(FINETUNED_METHODS)


# --------------------------------------------------------------------------------------------------
# The user's data: the `data_root` pipeline parameter and a PVC on the prepare-data task
# --------------------------------------------------------------------------------------------------


def test_data_root_is_a_pipeline_parameter_feeding_resolve_params(compiled, tmp_path: Path) -> None:
    spec, _, _ = compiled
    defs = spec["root"]["inputDefinitions"]["parameters"]
    assert defs["data_root"]["parameterType"] == "STRING" and defs["data_root"]["defaultValue"] == ""
    tasks = by_display_name(spec["root"]["dag"])
    for name, (_, t) in tasks.items():
        fed = t["inputs"]["parameters"].get("data_root")
        if name == "resolve-params":
            assert fed == {"componentInputParameter": "data_root"}
        else:  # every other step gets data.root inside the resolved params tree
            assert fed is None, name
    sweep, _, _ = _compile(tmp_path, "sweep.yaml", sweep=True)
    assert sweep["root"]["inputDefinitions"]["parameters"]["data_root"]["defaultValue"] == ""
    resolve = by_display_name(sweep["root"]["dag"])["resolve-params"][1]
    assert resolve["inputs"]["parameters"]["data_root"] == {"componentInputParameter": "data_root"}


def test_resolve_params_applies_data_root() -> None:
    from components.params import ParamsError, params_to_json
    from pipelines.components import resolve_params_json

    params = load_params(ROOT / "params.yaml")
    tree = params_to_json(params)
    keep = json.loads(resolve_params_json(tree, {}, data_root=""))
    assert keep["data"]["root"] == params.data.root
    for where in ("s3://team-data/cifar", "/data/cifar"):
        assert json.loads(resolve_params_json(tree, {}, data_root=where))["data"]["root"] == where
    with pytest.raises(ParamsError, match=r"data\.root: .*gs:// is not supported"):
        resolve_params_json(tree, {}, data_root="gs://team-data/cifar")


def test_data_pvc_is_mounted_on_prepare_data_only(tmp_path: Path, capsys) -> None:
    platform = tmp_path / "platform.yaml"
    platform.write_text(yaml.safe_dump({"data": {"pvc": "team-data", "mount_path": "/mnt/data"}}))
    out = tmp_path / "p.yaml"
    argv = ["compile", "--params", str(ROOT / "params.yaml"), "--platform", str(platform), "-o", str(out)]
    assert cli_main(argv) == 0
    _spec, platform_spec = list(yaml.safe_load_all(out.read_text()))
    k8s = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {label: ex["pvcMount"] for label, ex in k8s.items() if "pvcMount" in ex}
    assert list(mounted) == ["exec-prepare-data"]
    (mount,) = mounted["exec-prepare-data"]
    assert mount["mountPath"] == "/mnt/data"
    assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "team-data"
    assert "secretAsEnv" in k8s["exec-prepare-data"]  # the mount adds to the step's settings

    # mount_path defaults to /data; the local build (kfp.local) mounts nothing.
    platform.write_text("data: {pvc: team-data}\n")
    opts_local = PipelineOptions(local=True, data_pvc={"name": "team-data", "mount_path": "/data"})
    from kfp import compiler

    compiler.Compiler().compile(
        build_pipeline(load_params(ROOT / "params.yaml"), opts_local), str(tmp_path / "l.yaml")
    )
    assert len(list(yaml.safe_load_all((tmp_path / "l.yaml").read_text()))) == 1
    assert cli_main(argv) == 0
    k8s = list(yaml.safe_load_all(out.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]
    assert k8s["executors"]["exec-prepare-data"]["pvcMount"][0]["mountPath"] == "/data"
    capsys.readouterr()

    for bad, says in (
        ("data: {pvc: team-data, mount_path: data}\n", "absolute path"),
        ("data: {claim: team-data}\n", "unknown key"),
        ("data: {mount_path: /data}\n", "pvc"),
        ("data: team-data\n", "mapping"),
    ):
        platform.write_text(bad)
        assert cli_main(argv) == 2, bad
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and says in lines[0] and "data" in lines[0], (bad, err)


# --------------------------------------------------------------------------------------------------
# The report in the KFP UI: a Markdown artifact (table + embedded plots), the champion's confusion matrix
# --------------------------------------------------------------------------------------------------


def test_report_component_has_markdown_and_classification_metrics_outputs(compiled, tmp_path: Path) -> None:
    spec, _, _ = compiled
    sweep, _, _ = _compile(tmp_path, "sweep.yaml", sweep=True)
    for s, comp in ((spec, "comp-report"), (sweep, "comp-select-best")):
        outs = s["components"][comp]["outputDefinitions"]["artifacts"]
        kinds = {name: o["artifactType"]["schemaTitle"] for name, o in outs.items()}
        assert kinds["report_md"] == "system.Markdown", kinds
        assert kinds["confusion_matrix"] == "system.ClassificationMetrics", kinds
        assert kinds["metrics"] == "system.Metrics" and kinds["report"] == "system.Artifact"


def test_report_ui_artifacts_embed_plots_and_the_champions_confusion_matrix(tmp_path: Path) -> None:
    """What the report/select_best bodies write for the UI, from a report assembled out of evaluations."""
    import base64

    from kfp.dsl import ClassificationMetrics, Markdown

    from components.params import params_from_dict
    from pipelines.components import REPORT_PLOTS, assemble_report, publish_report_ui
    from tests.tiny_params import tiny_params

    params = params_from_dict(tiny_params())  # tracking off
    groups = {}
    for method, id_val in (("lp", 0.7), ("daft", 0.9)):
        d = tmp_path / "ev" / method
        d.mkdir(parents=True)
        row = {
            "method": method,
            "id_val_accuracy": id_val,
            "id_test_accuracy": id_val - 0.01,
            "ood": {"printed": id_val - 0.2},
            "ood_mean_accuracy": id_val - 0.2,
        }
        (d / f"{method}.json").write_text(json.dumps(row))
        cm = {"classes": ["zero", "one"], "matrix": [[5, 1], [2, 4 if method == "daft" else 3]]}
        details = {"sets": {"id_test": {"confusion_matrix": cm}, "id_val": {}}}
        (d / f"{method}.details.json").write_text(json.dumps(details))
        groups[method] = [str(d)]
    out = tmp_path / "report"
    summary = assemble_report(params, groups, str(out))
    assert summary["champion"] == "daft"

    md = Markdown(uri=str(tmp_path / "ui" / "report_md"))
    confusion = ClassificationMetrics(uri=str(tmp_path / "ui" / "confusion_matrix"))
    publish_report_ui(str(out), summary, md, confusion)
    text = Path(md.path).read_text()
    assert (out / "reports" / "table.md").read_text().strip() in text
    assert "`daft`" in text
    images = re.findall(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert [title for title, _ in images] == list(REPORT_PLOTS.values())
    for (_title, data), png in zip(images, REPORT_PLOTS, strict=True):
        assert base64.b64decode(data) == (out / "reports" / png).read_bytes()
    cm = confusion.metadata["confusionMatrix"]
    assert [c["displayName"] for c in cm["annotationSpecs"]] == ["zero", "one"]
    assert [r["row"] for r in cm["rows"]] == [[5, 1], [2, 4]]  # the champion's (daft), ID test
    assert confusion.metadata["method"] == "daft" and confusion.metadata["set"] == "id_test"

    # No confusion matrix in the champion's details (older evaluations): the Markdown still, and a note.
    (out / "metrics" / "methods" / "daft.details.json").write_text(json.dumps({"sets": {"id_test": {}}}))
    empty = ClassificationMetrics(uri=str(tmp_path / "ui2" / "confusion_matrix"))
    publish_report_ui(str(out), summary, Markdown(uri=str(tmp_path / "ui2" / "report_md")), empty)
    assert "confusionMatrix" not in empty.metadata and "daft" in empty.metadata["note"]


def test_sweep_points_must_be_the_published_method(tmp_path: Path) -> None:
    """A DAFT sweep point with head lr <= backbone lr is refused unless the branch is a named variant."""
    from components.params import params_from_dict
    from pipelines.pipeline import sweep_points

    params = load_params("params.yaml")
    bad = {"daft": {"head_lr": [0.01], "backbone_lr": [0.01]}}
    with pytest.raises(ValueError, match=r"sweep for 'daft': .*much faster.*variant"):
        sweep_points(params, "daft", bad)
    with pytest.raises(ValueError, match="much faster"):
        _compile(tmp_path, "bad.yaml", sweep=True, sweep_grid=bad)
    raw = params.model_dump(mode="json")
    raw["finetune"]["methods"]["daft"]["variant"] = "equal-lrs"
    named = params_from_dict(raw)
    assert sweep_points(named, "daft", bad) == [{"head_lr": 0.01, "backbone_lr": 0.01}]
    # The catalogue's own grids are all published points.
    for method in ("ft", "lp_ft", "daft"):
        assert sweep_points(params, method, {})

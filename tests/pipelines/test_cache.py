"""Kubeflow caching across runs: a step's inputs (its cache key) change only when what it reads changes.

* The KFP run id is no task input: it reaches the steps as ``DAFT_PIPELINE_RUN_ID`` from the pod's
  ``pipeline/runid`` label (kfp-kubernetes ``use_field_path_as_env``).
* ``resolve_params`` hands each step only its params sections (``STEP_PARAMS``, as dvc.yaml lists them, plus
  ``pipeline``), so a change of ``finetune.*`` leaves the inputs of prepare_data, pretrained, convert_bn and
  linear_probe as they were.

The compiled IR says what each task takes (pipeline parameters, resolve_params' outputs, upstream artifacts);
:func:`cache_keys` resolves it the way the backend does (resolve_params run on the compiled defaults) and
chains the keys through the artifacts: a task whose producers are cache hits gets the same artifacts.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.params import load_params, params_from_dict
from pipelines import components as kfp_components
from pipelines.components import COMMON_PARAMS, STEP_PARAMS, split_params, step_setup, step_tree
from pipelines.pipeline import PipelineOptions, compile_pipeline
from tests.pipelines.artifacts import Art

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/ml/daft-pipeline:1.2.3"
UPSTREAM = ("prepare-data", "pretrained", "convert-bn", "linear-probe")


def _compile(tmp_path: Path, name: str, overrides: dict[str, Any], **opts: Any) -> tuple[dict, dict]:
    params = load_params(ROOT / "params.yaml", overrides)
    out = tmp_path / name
    compile_pipeline(params, PipelineOptions(image=IMAGE, **opts), str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], docs[1]


def _resolve_outputs(defaults: dict[str, Any], task: dict, tmp: Path) -> dict[str, Any]:
    """Run resolve_params on the compiled defaults, as the backend would: its output parameters by name."""
    values = {n: defaults[src["componentInputParameter"]] for n, src in task["inputs"]["parameters"].items()}
    returned = kfp_components.resolve_params(**values, params=Art(str(tmp / "params.json")))
    fields = inspect.signature(kfp_components.resolve_params).return_annotation._fields
    return dict(zip(fields, returned, strict=True))


def cache_keys(spec: dict, tmp: Path, run: str = "run-1") -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """display name -> an emulated cache key (component, resolved parameter values, the producers' keys of
    the input artifacts); and display name -> its resolved parameter values. A run-time placeholder
    (``{{$.pipeline_job_uuid}}`` ...) resolves to a value of the run `run`."""
    dag = spec["root"]["dag"]["tasks"]
    defaults = {
        k: int(v["defaultValue"]) if v["parameterType"] == "NUMBER_INTEGER" else v.get("defaultValue")
        for k, v in spec["root"]["inputDefinitions"]["parameters"].items()
    }  # the IR writes integers as 3.0; the backend hands the component an int
    name_of = {k: t["taskInfo"]["name"] for k, t in dag.items()}
    resolve_key = next(k for k, n in name_of.items() if n == "resolve-params")
    outputs = _resolve_outputs(defaults, dag[resolve_key], tmp)
    keys: dict[str, str] = {}
    values: dict[str, dict[str, Any]] = {}

    def key(k: str) -> str:
        if k in keys:
            return keys[k]
        t = dag[k]
        params: dict[str, Any] = {}
        for name, src in t["inputs"].get("parameters", {}).items():
            if "componentInputParameter" in src:
                params[name] = defaults[src["componentInputParameter"]]
            elif "runtimeValue" in src:
                value = src["runtimeValue"]["constant"]
                params[name] = f"{value}@{run}" if "{{$" in str(value) else value
            else:
                out = src["taskOutputParameter"]
                if out["producerTask"] == resolve_key:  # by value: resolve_params re-runs, cheaply
                    params[name] = outputs[out["outputParameterKey"]]
                else:  # another step's result: the same as long as that step is a cache hit
                    params[name] = (key(out["producerTask"]), out["outputParameterKey"])
        arts = {
            name: (
                key(src["taskOutputArtifact"]["producerTask"]),
                src["taskOutputArtifact"]["outputArtifactKey"],
            )
            for name, src in t["inputs"].get("artifacts", {}).items()
        }
        comp = spec["components"][t["componentRef"]["name"]]
        container = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
        program = [container["image"], container["command"], container.get("args")]
        payload = json.dumps([program, params, arts], sort_keys=True, default=str)
        keys[k] = hashlib.sha256(payload.encode()).hexdigest()
        values[name_of[k]] = params
        return keys[k]

    return {name_of[k]: key(k) for k in dag}, values


def test_finetune_changes_leave_the_upstream_steps_cached(tmp_path: Path) -> None:
    base = load_params(ROOT / "params.yaml")
    changed = {
        "finetune.epochs": base.finetune.epochs + 2,
        "finetune.methods.daft.head_lr": 0.5,
        "finetune.momentum": 0.5,
    }
    spec_a, _ = _compile(tmp_path, "a.yaml", {})
    spec_b, _ = _compile(tmp_path, "b.yaml", changed)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    keys_a, values_a = cache_keys(spec_a, tmp_path / "a")
    keys_b, values_b = cache_keys(spec_b, tmp_path / "b")
    assert set(keys_a) == set(keys_b)

    # The upstream steps (and the probe's evaluation) take exactly the same inputs: cache hits.
    for name in (*UPSTREAM, "evaluate-lp"):
        assert values_a[name] == values_b[name], name
        assert keys_a[name] == keys_b[name], name
    # What reads finetune.* runs again, and so does everything downstream of it.
    for method in base.finetune.methods:
        assert values_a[f"finetune-{method}"] != values_b[f"finetune-{method}"], method
        assert keys_a[f"evaluate-{method}"] != keys_b[f"evaluate-{method}"], method
    assert keys_a["report"] != keys_b["report"]
    ft = json.loads(values_b["finetune-daft"]["params_json"])
    assert ft["finetune"]["epochs"] == base.finetune.epochs + 2
    assert values_b["finetune-daft"]["learning_rates"]["daft"]["head_lr"] == 0.5

    # A second run with the same params: every task is a cache hit (the run id is no input).
    spec_a2, _ = _compile(tmp_path, "a2.yaml", {})
    (tmp_path / "a2").mkdir()
    assert cache_keys(spec_a2, tmp_path / "a2", run="run-2")[0] == keys_a

    # The opposite direction: a change in `data` re-runs everything that reads the data.
    spec_c, _ = _compile(tmp_path, "c.yaml", {"data.seed": 7})
    (tmp_path / "c").mkdir()
    keys_c, _ = cache_keys(spec_c, tmp_path / "c")
    assert all(keys_c[n] != keys_a[n] for n in keys_a)


def test_no_task_input_carries_the_run_id(tmp_path: Path) -> None:
    for sweep in (False, True):
        spec, platform = _compile(tmp_path, f"p{sweep}.yaml", {}, sweep=sweep)
        text = json.dumps(spec)
        assert "pipeline_job_uuid" not in text and "pipeline_job_id" not in text
        assert "pipeline_run_id" not in text
        for name, comp in spec["components"].items():
            assert "pipeline_run_id" not in comp.get("inputDefinitions", {}).get("parameters", {}), name
        # Every task reads the run id from its pod's label instead.
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert set(executors) == set(spec["deploymentSpec"]["executors"])
        for label, ex in executors.items():
            envs = {e["name"]: e["fieldPath"] for e in ex.get("fieldPathAsEnv", [])}
            assert envs["DAFT_PIPELINE_RUN_ID"] == "metadata.labels['pipeline/runid']", label


def test_sweep_loop_steps_read_their_slice_from_the_params_artifact(tmp_path: Path) -> None:
    spec, _ = _compile(tmp_path, "sweep.yaml", {}, sweep=True)
    loops = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    assert loops
    for loop in loops:
        body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
        for t in body.values():
            assert "params_file" in t["inputs"]["artifacts"], t["taskInfo"]["name"]
            assert "params_json" not in t["inputs"].get("parameters", {})
        # The loop gets resolve_params' `params` artifact.
        src = loop["inputs"]["artifacts"]
        assert any(a["taskOutputArtifact"]["outputArtifactKey"] == "params" for a in src.values())


def test_params_artifact_and_step_setup_give_each_step_its_slice(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DAFT_EXPECT_GPU", raising=False)
    params = load_params(ROOT / "params.yaml")
    tree = params.model_dump(mode="json")
    returned = kfp_components.resolve_params(
        params_json=json.dumps(tree),
        tracking=False,
        experiment="exp-x",
        registered_model="model-x",
        epochs=9,
        seed=3,
        params=Art(str(tmp_path / "params.json")),
        data_root="",
    )
    fields = inspect.signature(kfp_components.resolve_params).return_annotation._fields
    assert tuple(fields) == tuple(STEP_PARAMS)  # the outputs are the steps, in STEP_PARAMS' order
    outputs = dict(zip(fields, returned, strict=True))
    on_disk = json.loads((tmp_path / "params.json").read_text())
    assert set(on_disk) == set(STEP_PARAMS)
    for step, text in outputs.items():
        assert json.loads(text) == on_disk[step]
        assert set(json.loads(text)) == {*COMMON_PARAMS, *(p.split(".")[0] for p in STEP_PARAMS[step])}
    assert json.loads(outputs["finetune"])["finetune"]["epochs"] == 9
    assert json.loads(outputs["pretrained"])["finetune"] == {"seed": 3}  # its seeded init, nothing else
    assert json.loads(outputs["report"]) == {
        "pipeline": {
            **tree["pipeline"],
            "tracking": False,
            "experiment": "exp-x",
            "registered_model": "model-x",
        }
    }
    # step_setup: from the string, or from the artifact (a sweep's loop), the same validated slice.
    from_string = step_setup("finetune", outputs["finetune"], "")
    from_file = step_setup("evaluate", "", "", Art(str(tmp_path / "params.json")))
    assert from_string.finetune.epochs == 9 and from_string.evaluate.batch_size == params.evaluate.batch_size
    assert from_file.evaluate == params.evaluate and from_file.pipeline.experiment == "exp-x"


def test_each_slice_validates_and_keeps_its_values() -> None:
    params = load_params(ROOT / "params.yaml")
    tree = params.model_dump(mode="json")
    slices = split_params(json.dumps(tree))
    assert list(slices) == list(STEP_PARAMS)
    for step, text in slices.items():
        got = params_from_dict(json.loads(text), step).model_dump(mode="json")
        for dotted in (*COMMON_PARAMS, *STEP_PARAMS[step]):
            a, b = got, tree
            for part in dotted.split("."):
                a, b = a[part], b[part]
            assert a == b, (step, dotted)
    assert step_tree(tree, "report") == {"pipeline": tree["pipeline"]}


def _dvc_params() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out: dict[str, list[str]] = {}
    for name, stage in stages.items():
        spec = stage.get("do", stage)
        step = "evaluate" if name.startswith("evaluate_") else name  # evaluate_lp, evaluate_wise_ft
        out.setdefault(step, []).extend(str(p) for p in spec.get("params", []))
    return out


def _covered(key: str, grants: tuple[str, ...]) -> bool:
    return any(key == g or key.startswith(g + ".") for g in grants)


def test_step_params_cover_what_dvc_yaml_lists() -> None:
    dvc = _dvc_params()
    assert set(dvc) <= set(STEP_PARAMS)
    for step, keys in dvc.items():
        for key in keys:
            assert _covered(key.replace("${key}", "daft"), (*COMMON_PARAMS, *STEP_PARAMS[step])), (step, key)


# Params methods that read the finetune section (the method catalogue's entries and learning rates).
METHOD_READS = {"recipe": "finetune.methods", "method": "finetune.methods", "with_method_lrs": "finetune"}
STEP_MODULES = {
    "prepare_data": "components/prepare_data.py",
    "pretrained": "components/pretrained.py",
    "convert_bn": "components/convert_bn.py",
    "linear_probe": "components/linear_probe.py",
    "finetune": "components/finetune.py",
    "wise_ft": "components/wise_ft.py",
    "evaluate": "components/evaluate.py",
    "report": "components/report.py",
}
SECTIONS = ("pipeline", "data", "model", "convert_bn", "linear_probe", "finetune", "evaluate", "wise_ft")


def _section_reads(source: str) -> set[str]:
    """Dotted params paths a module reads: ``params.<section>[.<key>]`` (two levels at most) and the
    Params methods it calls (METHOD_READS). ``params`` passed on whole is followed by the other checks."""
    reads: set[str] = set()
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == "params"):
            continue
        chain: list[str] = []
        cur: ast.AST = node
        while isinstance(parents.get(cur), ast.Attribute):
            cur = parents[cur]
            chain.append(cur.attr)  # type: ignore[attr-defined]
        if not chain:
            continue  # params passed on whole (to tracked, publish_model, finetune_config, ...)
        head = chain[0]
        if head in METHOD_READS:
            reads.add(METHOD_READS[head])
        elif head in SECTIONS:
            nested = len(chain) > 1 and chain[1] not in ("model_dump", "methods")
            reads.add(f"{head}.{chain[1]}" if nested else head)
        else:
            reads.add(f"?{head}")
    return reads


@pytest.mark.parametrize("step", sorted(STEP_MODULES))
def test_each_step_reads_only_its_sections(step: str) -> None:
    """What a step's module, the helpers it hands `params` to and its KFP wrapper read of the params tree
    is in its slice (a section left out would silently read its defaults)."""
    grants = (*COMMON_PARAMS, *STEP_PARAMS[step])
    module = ROOT / STEP_MODULES[step]
    reads = _section_reads(module.read_text())
    assert reads, step
    # components/common.py (tracked: MLflow) serves every step.
    reads |= _section_reads((ROOT / "components" / "common.py").read_text())
    # components/publish.py (the registered version's description) serves the model-producing steps; a
    # stage's own section (convert_bn, linear_probe, finetune) is read only for that stage.
    if "publish_model(" in module.read_text():
        own = {"convert_bn": "convert_bn", "linear_probe": "linear_probe", "finetune": "finetune"}
        others = {section for s, section in own.items() if s != step}
        reads |= {
            r
            for r in _section_reads((ROOT / "components" / "publish.py").read_text())
            if r.split(".")[0] not in others
        }
    # The KFP wrapper of the step (pipelines/components.py), read the same way.
    wrapper = _function_source(ROOT / "pipelines" / "components.py", step)
    reads |= {r for r in _section_reads(wrapper) if not r.startswith("?")}
    outside = sorted(r for r in reads if not _covered(r, grants))
    assert not outside, f"step {step} reads {outside}: add them to STEP_PARAMS[{step!r}]"


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(path.read_text(), node) or ""

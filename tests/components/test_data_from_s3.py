"""prepare_data reading the user's data from S3 (the session's moto server on 127.0.0.1): each remote
location is downloaded once into a workspace that disappears afterwards, the bundle equals the one built
from the same tree on local disk, the manifest records the URI and a digest of what was read, and MLflow's
dataset source is the URI (here and in the later steps)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from components import prepare_data, storage
from components.common import load_data, tracked
from components.params import ParamsError, params_from_dict
from components.storage import StorageError
from daft_core.data import load_bundle, read_manifest
from daft_core.data.imagefolder import ImageTooLargeError
from tests.servers import S3Server
from tests.tiny_params import tiny_params

CLASSES = ("cat", "dog", "fox")
# split -> images per class; id_val is carved from id_train (val_fraction 0.25: 3 train + 1 val per class)
LAYOUT = {"id_train": 4, "id_test": 2, "ood/far": 1}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny imagefolder root: 3 classes of 8x8 PNGs in id_train/, id_test/ and ood/far/."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in LAYOUT.items():
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 64, (8, 8, 3), dtype=np.uint8) + np.uint8(80 * c)
                Image.fromarray(px).save(folder / f"{i}.png")
    return root


def _upload(s3: S3Server, folder: Path, name: str = "data") -> str:
    """Every file under `folder` to a fresh prefix (the bucket is shared by the session); its URI."""
    prefix = f"test-data-from-s3/{uuid.uuid4().hex[:8]}/{name}"
    client = s3.client()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(f), s3.bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")
    return f"s3://{s3.bucket}/{prefix}"


def _params(**data: Any) -> Any:
    return params_from_dict(
        tiny_params(data={"preset": "imagefolder", "image_size": 8, "val_fraction": 0.25, **data})
    )


def _digest(folder: Path) -> str:
    """The documented source digest, computed independently: sha256 over sorted `<sha256>  <path>` lines."""
    lines = sorted(
        (f.relative_to(folder).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest())
        for f in folder.rglob("*")
        if f.is_file()
    )
    return hashlib.sha256("".join(f"{h}  {rel}\n" for rel, h in lines).encode()).hexdigest()


def _files(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


def test_s3_root_gives_the_same_bundle_as_local_disk(s3: S3Server, tree: Path, tmp_path: Path) -> None:
    uri = _upload(s3, tree)
    local = prepare_data.run(_params(root=str(tree)), tmp_path / "local")
    remote = prepare_data.run(_params(root=uri), tmp_path / "remote")

    assert remote["counts"] == local["counts"] == {"id_train": 9, "id_val": 3, "id_test": 6, "ood.far": 3}
    a, b = load_bundle(tmp_path / "local"), load_bundle(tmp_path / "remote")
    assert a.class_names == b.class_names == list(CLASSES)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test), (a.ood["far"], b.ood["far"])):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)

    meta = read_manifest(tmp_path / "remote")["meta"]
    assert meta["sources"] == {"data.root": {"uri": uri, "sha256": _digest(tree), "files": _files(tree)}}
    assert meta["source_uri"] == uri
    # The recorded paths are the URIs, not the (deleted) workspace; a local run records no sources.
    assert meta["id"]["id_train"]["path"] == f"{uri}/id_train"
    assert meta["ood"]["far"]["path"] == f"{uri}/ood/far"
    assert "sources" not in read_manifest(tmp_path / "local")["meta"]
    # The workspace beside the output is gone: only the two outputs are left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "remote"]


def test_digest_follows_the_content_and_workspace_env(
    s3: S3Server, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "ws"
    monkeypatch.setenv(prepare_data.WORKSPACE_ENV, str(ws))
    uri = _upload(s3, tree)
    prepare_data.run(_params(root=uri), tmp_path / "one")
    first = read_manifest(tmp_path / "one")["meta"]["sources"]["data.root"]
    assert ws.is_dir() and list(ws.iterdir()) == []  # the download went there and was removed

    # One file changes (same name, other pixels): the digest changes, the file count does not.
    changed = tmp_path / "changed.png"
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(changed)
    bucket, key = storage.split_s3_uri(f"{uri}/id_train/dog/0.png")
    s3.client().upload_file(str(changed), bucket, key)
    prepare_data.run(_params(root=uri), tmp_path / "two")
    second = read_manifest(tmp_path / "two")["meta"]["sources"]["data.root"]
    assert second["files"] == first["files"] and second["uri"] == first["uri"]
    assert second["sha256"] != first["sha256"]
    assert list(ws.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.png", "one", "two", "ws"]


def test_each_remote_location_is_read_once(
    s3: S3Server, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locations inside data.root reuse its download; another prefix is its own download."""
    uri = _upload(s3, tree)
    sketch = _upload(s3, tree / "ood" / "far", "sketch")
    calls: list[str] = []
    real = storage.fetch_tree

    def spy(uri_prefix: str, dest: Any) -> list[Path]:
        calls.append(uri_prefix)
        return real(uri_prefix, dest)

    monkeypatch.setattr(storage, "fetch_tree", spy)
    params = _params(
        root=uri + "/",
        id_test=f"{uri}/id_test",
        ood={"far": f"{uri}/ood/far"},
        extra_ood={"sketch": sketch, "again": f"{uri}/ood/far/"},
    )
    result = prepare_data.run(params, tmp_path / "out")
    assert sorted(calls) == sorted([uri, sketch])
    assert result["counts"]["ood.sketch"] == result["counts"]["ood.again"] == result["counts"]["ood.far"] == 3
    sources = read_manifest(tmp_path / "out")["meta"]["sources"]
    assert set(sources) == {
        "data.root",
        "data.id_test",
        "data.ood.far",
        "data.extra_ood.sketch",
        "data.extra_ood.again",
    }
    assert sources["data.id_test"] == {
        "uri": f"{uri}/id_test",
        "sha256": _digest(tree / "id_test"),
        "files": _files(tree / "id_test"),
    }
    assert (
        sources["data.extra_ood.sketch"]["sha256"]
        == sources["data.ood.far"]["sha256"]
        == _digest(tree / "ood" / "far")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_prefix_is_one_clear_error(
    s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"s3://{s3.bucket}/test-data-from-s3/{uuid.uuid4().hex[:8]}/nothing"
    with pytest.raises(StorageError, match=f"^{uri}: no objects under this prefix"):
        prepare_data.run(_params(root=uri), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no workspace

    (tmp_path / "params.yaml").write_text(
        json.dumps(tiny_params(data={"preset": "imagefolder", "root": uri}))
    )
    assert prepare_data.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and uri in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_library_checks_name_the_s3_object(s3: S3Server, tree: Path, tmp_path: Path) -> None:
    """The data checks apply to the download; the message names the object's URI, not the workspace."""
    uri = _upload(s3, tree)
    with pytest.raises(ImageTooLargeError) as info:
        prepare_data.run(_params(root=uri, max_pixels=10), tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{uri}/id_train/cat/") and "data.max_pixels=10" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"root": "gs://bucket/data"}, "data.root"),
        ({"root": "/data", "ood": {"far": "http://example.com/far"}}, "data.ood.far"),
        ({"root": "/data", "extra_ood": {"sketch": "file:///sketch"}}, "data.extra_ood.sketch"),
        ({"id_train": "s3:///no-bucket", "id_test": "/data/test"}, "data.id_train"),
    ],
)
def test_params_accept_a_path_or_an_s3_uri_only(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamsError, match=rf"{key}: .*(not supported|malformed)"):
        _params(**data)
    ok = _params(root="s3://bucket/data/", ood={"far": "/mnt/far"}, extra_ood={"s": "relative/dir"})
    assert ok.data.root == "s3://bucket/data/"


@pytest.mark.slow
def test_mlflow_dataset_source_is_the_s3_uri(
    s3: S3Server, mlflow_server: Any, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from components.tracking import DATA_DIGEST_TAG

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("DAFT_PIPELINE_RUN_ID", uuid.uuid4().hex)
    uri = _upload(s3, tree)
    experiment = f"daft-s3-data-{uuid.uuid4().hex[:8]}"
    params = params_from_dict(
        {
            **_params(root=uri).model_dump(mode="json"),
            "pipeline": {"experiment": experiment, "tracking": True},
        }
    )
    prepare_data.run(params, tmp_path / "data")
    with tracked(params, "pretrained", {}) as tracker:  # what every later step does with the bundle
        load_data(tmp_path / "data", tracker, "training")

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    prep, later = runs["prepare_data"], runs["pretrained"]
    for run in (prep, later):
        (inp,) = run.inputs.dataset_inputs
        assert json.loads(inp.dataset.source) == {"uri": uri}
        assert inp.dataset.source_type == "s3"
    # The digest is the prepared bundle's, the same in both steps.
    assert prep.data.tags[DATA_DIGEST_TAG] == later.data.tags[DATA_DIGEST_TAG]
    assert prep.inputs.dataset_inputs[0].dataset.digest == later.inputs.dataset_inputs[0].dataset.digest

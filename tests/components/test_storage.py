"""components.storage against a real S3 API (the session's moto server on 127.0.0.1), plus the core hook.

The core reads local files only; these tests check that ``storage.install()`` is all it takes for
``load_model``/``build_model`` to read ``s3://``, and that every failure is one line naming the URI.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from components import storage
from components.storage import StorageError
from daft_core.models import CheckpointError, build_model, load_model, load_state_dict_file, save_model
from tests.servers import S3Server, free_port


def _uint8(n: int, s: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix: the bucket is shared with every other test of the session."""
    return f"test-storage/{uuid.uuid4().hex[:8]}"


def test_is_uri_and_split() -> None:
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b/k")
    assert not storage.is_uri("models/m.pt") and not storage.is_uri(Path("/tmp/s3:/x"))
    assert storage.split_s3_uri("s3://bucket/a/b.pt") == ("bucket", "a/b.pt")
    with pytest.raises(StorageError, match="only s3:// URIs are supported, not gs://"):
        storage.split_s3_uri("gs://bucket/a")
    with pytest.raises(StorageError, match="malformed"):
        storage.split_s3_uri("s3:///a")


def test_models_load_from_s3_once_installed(s3: S3Server, prefix: str, tmp_path: Path) -> None:
    storage.install()
    storage.install()  # idempotent: common.py calls it in every step
    client = s3.client()
    m = build_model("tiny_cnn", num_classes=3, input_size=16).eval()
    client.upload_file(str(save_model(m, tmp_path / "m.pt", extra={"k": 1})), s3.bucket, f"{prefix}/m.pt")
    torch.save(m.state_dict(), tmp_path / "raw.pt")
    client.upload_file(str(tmp_path / "raw.pt"), s3.bucket, f"{prefix}/raw.pt")
    x = _uint8(2)

    loaded = load_model(f"s3://{s3.bucket}/{prefix}/m.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert loaded.extra == {"k": 1}

    weights = f"s3://{s3.bucket}/{prefix}/raw.pt"
    from_raw = build_model("tiny_cnn", weights=weights, num_classes=3, input_size=16).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_raw(x), m(x), rtol=0, atol=0)
    assert from_raw.spec["weights"] == weights


def test_s3_specific_endpoint_wins(s3: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/a.txt", Body=b"a")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    assert storage.endpoint_url() == s3.endpoint
    assert storage.s3_client().get_object(Bucket=s3.bucket, Key=f"{prefix}/a.txt")["Body"].read() == b"a"


def test_fetch_tree_keeps_relative_paths(s3: S3Server, prefix: str, tmp_path: Path) -> None:
    client = s3.client()
    objects = {"manifest.json": b"{}", "id_train/images.npy": b"img", "ood/fonts/labels.npy": b"lab"}
    for rel, body in objects.items():
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/data/{rel}", Body=body)
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}/data/empty_dir/", Body=b"")  # folder marker
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}/data2/other.npy", Body=b"no")  # sibling prefix

    dest = tmp_path / "prepared"
    written = storage.fetch_tree(f"s3://{s3.bucket}/{prefix}/data", dest)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == sorted(objects)
    for rel, body in objects.items():
        assert (dest / rel).read_bytes() == body
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(objects)
    # a trailing slash means the same prefix
    again = storage.fetch_tree(f"s3://{s3.bucket}/{prefix}/data/", tmp_path / "again")
    assert len(again) == len(objects)
    with pytest.raises(StorageError, match="no objects under this prefix"):
        storage.fetch_tree(f"s3://{s3.bucket}/{prefix}/nothing", tmp_path / "none")


class _FakeClient:
    """A listing with a hostile key, which a real bucket may well hold; records what was downloaded."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.downloaded: list[str] = []

    def get_paginator(self, _op: str) -> Any:
        keys = self.keys

        class _Pages:
            def paginate(self, **_kw: Any) -> list[dict[str, Any]]:
                return [{"Contents": [{"Key": k} for k in keys]}]

        return _Pages()

    def download_file(self, _bucket: str, key: str, dest: str) -> None:
        self.downloaded.append(key)
        Path(dest).write_bytes(b"x")


@pytest.mark.parametrize("bad", ["p/../evil", "p/a/../../evil", "p/..", "p//etc/passwd", "p/a\\..\\b"])
def test_fetch_tree_refuses_keys_that_escape(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeClient(["p/ok.txt", bad])
    monkeypatch.setattr(storage, "s3_client", lambda: fake)
    with pytest.raises(StorageError, match="refusing object key"):
        storage.fetch_tree("s3://bucket/p", tmp_path / "out")
    assert fake.downloaded == []  # checked before anything is written
    assert not (tmp_path / "evil").exists()


def test_errors_are_one_line_and_name_the_uri(
    s3: S3Server, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.install()
    missing = f"s3://{s3.bucket}/{prefix}/missing.pt"
    with pytest.raises(StorageError) as err:
        storage.fetch_file(missing, tmp_path / "m.pt")
    assert str(err.value).startswith(missing) and "no object with key" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "m.pt").exists()
    with pytest.raises(CheckpointError, match=f"^{missing}: no object with key"):  # through the core hook
        load_state_dict_file(missing)
    with pytest.raises(CheckpointError, match="no object with key"):
        build_model("tiny_cnn", weights=missing)

    no_bucket = "s3://no-such-bucket-daft/m.pt"
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-daft' does not exist"):
        storage.fetch_file(no_bucket, tmp_path / "m.pt")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-daft' does not exist"):
        storage.fetch_tree("s3://no-such-bucket-daft/data", tmp_path / "d")
    with pytest.raises(StorageError, match="names a prefix"):
        storage.fetch_file(f"s3://{s3.bucket}/{prefix}/", tmp_path / "m.pt")

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {dead}"):
        storage.fetch_file(missing, tmp_path / "m.pt")

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no usable S3 credentials"):
        storage.fetch_file(missing, tmp_path / "m.pt")

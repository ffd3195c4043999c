"""Object storage (S3 API) for the pipeline: the one place that talks to boto3.

``daft_core`` reads local files only, so that the library needs no cloud SDK; :func:`install` plugs
:func:`fetch_file` into its URI hook so ``build_model(weights="s3://...")`` and ``load_model("s3://...")``
work in every step. The endpoint and credentials come from the environment (a pod gets them from
Kubernetes secrets), never from params, so the same params run against AWS, MinIO or a test server.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "StorageError",
    "delete",
    "endpoint_url",
    "exists",
    "fetch_file",
    "fetch_tree",
    "file_sha256",
    "install",
    "is_uri",
    "put_file",
    "s3_client",
    "split_s3_uri",
    "tree_digest",
    "tree_hashes",
]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
FETCH_WORKERS = 8  # parallel downloads in fetch_tree


class StorageError(RuntimeError):
    """A remote object cannot be fetched; the one-line message names the URI and what to fix."""


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (s3 or any other), so callers route it here instead of to the file system."""
    return bool(_URI.match(os.fspath(path)))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty (a whole bucket)."""
    if not uri.startswith("s3://"):
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        raise StorageError(f"{uri}: only s3:// URIs are supported" + (f", not {scheme}://" if scheme else ""))
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: malformed S3 URI, expected s3://bucket/key")
    return bucket, key


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (MinIO, moto, ...); None means AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client() -> Any:
    """A boto3 S3 client for :func:`endpoint_url`, credentials from boto3's usual environment chain.

    A fresh session each time: boto3's default session caches credentials process-wide, which would
    ignore a changed environment and share state with other boto3 users (MLflow, DVC) in the process.
    """
    import boto3
    from botocore.config import Config

    # connections for fetch_tree's parallel downloads, each of which may itself fetch a large object in parts
    config = Config(max_pool_connections=FETCH_WORKERS * 10)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url(), config=config)


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _bucket_missing(client: Any, bucket: str) -> bool:
    """Tell a missing bucket from a missing key: a HEAD on the object answers a bare 404 for both."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        return _code(e) in ("404", "NoSuchBucket", "NotFound")
    except BotoCoreError:
        return False
    return False


def _explain(uri: str, e: Exception, client: Any) -> StorageError:
    """One line a person can act on: which URI, what is wrong, where it looked."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"{uri}: no usable S3 credentials ({e}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        )
    if isinstance(e, BotoConnectionError):
        endpoint = endpoint_url() or getattr(e, "kwargs", {}).get("endpoint_url", "?")
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint {endpoint} ({type(e).__name__}); check "
            "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the network"
        )
    if isinstance(e, ClientError):
        code = _code(e)
        bucket, key = split_s3_uri(uri)
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and _bucket_missing(client, bucket)):
            return StorageError(f"{uri}: bucket {bucket!r} does not exist{_at()}")
        if code in ("404", "NoSuchKey", "NotFound"):
            return StorageError(f"{uri}: no object with key {key!r} in bucket {bucket!r}{_at()}")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied ({code}); check the S3 credentials{_at()}")
        return StorageError(f"{uri}: S3 error {code or '?'}{_at()}: {e}")
    return StorageError(f"{uri}: {type(e).__name__}{_at()}: {e}")


def _at() -> str:
    return f" at {endpoint_url()}" if endpoint_url() else ""


def fetch_file(uri: str, dest: str | os.PathLike[str]) -> Path:
    """Download the object at ``s3://bucket/key`` to the local file ``dest`` (parents created)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: names a prefix, not an object (use fetch_tree for a directory)")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    client = s3_client()
    try:
        client.download_file(bucket, key, str(dest))  # s3transfer writes a temp file, then renames
    except (ClientError, BotoCoreError) as e:
        raise _explain(uri, e, client) from e
    return dest


def _relative_key(uri: str, key: str, prefix: str) -> PurePosixPath:
    """The path of ``key`` below ``prefix``, refusing anything that could land outside the target dir."""
    rel = key[len(prefix) :]
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or ".." in parts:
        raise StorageError(
            f"{uri}: refusing object key {key!r}: it is not a plain path inside the target dir"
        )
    return PurePosixPath(*parts)


def fetch_tree(uri_prefix: str, dest_dir: str | os.PathLike[str]) -> list[Path]:
    """Download every object under ``s3://bucket/prefix/`` into ``dest_dir``, keeping relative paths.

    The prefix is taken as a directory (``data`` does not match ``data2/...``). All keys are checked
    before anything is written, so a hostile listing (``../x``) leaves ``dest_dir`` untouched. Objects are
    downloaded :data:`FETCH_WORKERS` at a time; returns the local files in key order. Callers that need the
    tree to appear all at once wrap this in ``daft_core.atomic.atomic_dir``.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri_prefix)
    prefix = key if not key or key.endswith("/") else key + "/"
    dest = Path(dest_dir)
    client = s3_client()
    try:
        keys = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")  # "folder" markers hold no data
        ]
    except (ClientError, BotoCoreError) as e:
        raise _explain(uri_prefix, e, client) from e
    if not keys:
        raise StorageError(f"{uri_prefix}: no objects under this prefix{_at()}")
    plan = [(k, dest / _relative_key(uri_prefix, k, prefix)) for k in keys]
    root = dest.resolve()
    for k, target in plan:
        if not target.resolve().is_relative_to(root):
            raise StorageError(f"{uri_prefix}: refusing object key {k!r}: it resolves outside {dest}")
    for _, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)

    def download(item: tuple[str, Path]) -> Path:
        k, target = item
        try:
            client.download_file(bucket, k, str(target))  # boto3 clients are thread-safe
        except (ClientError, BotoCoreError) as e:
            raise _explain(f"s3://{bucket}/{k}", e, client) from e
        return target

    if len(plan) == 1:
        return [download(plan[0])]
    # Several objects at once: an image folder is many small files, where the round trips dominate.
    pool = ThreadPoolExecutor(max_workers=min(FETCH_WORKERS, len(plan)), thread_name_prefix="fetch_tree")
    try:
        return list(pool.map(download, plan))  # the first failure (in key order) is raised
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _object_key(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of a URI that must name one object, not a prefix."""
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: names a prefix, not an object")
    return bucket, key


def put_file(path: str | os.PathLike[str], uri: str) -> str:
    """Upload the local file ``path`` to the object ``s3://bucket/key``; returns ``uri``.

    Atomic for readers: S3 makes an object visible only once its PUT (or multipart upload) completes, so
    a reader sees the previous object or the new one, never a torn one.
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _object_key(uri)
    client = s3_client()
    try:
        client.upload_file(os.fspath(path), bucket, key)
    except S3UploadFailedError as e:  # boto3 wraps the ClientError of a failed upload
        cause = e.__context__ if isinstance(e.__context__, ClientError) else e
        raise _explain(uri, cause, client) from e
    except (ClientError, BotoCoreError) as e:
        raise _explain(uri, e, client) from e
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: cannot upload {path}: no such file") from e
    return uri


def exists(uri: str) -> bool:
    """True when the object ``s3://bucket/key`` exists; False when only the key is missing (a missing
    bucket, refused credentials or an unreachable endpoint raise :class:`StorageError`)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _object_key(uri)
    client = s3_client()
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if _code(e) in ("404", "NoSuchKey", "NotFound") and not _bucket_missing(client, bucket):
            return False
        raise _explain(uri, e, client) from e
    except BotoCoreError as e:
        raise _explain(uri, e, client) from e
    return True


def delete(uri: str) -> None:
    """Delete the object ``s3://bucket/key``; a key that is already gone is fine (S3 semantics)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _object_key(uri)
    client = s3_client()
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as e:
        raise _explain(uri, e, client) from e


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The sha256 (hex) of one file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: str | os.PathLike[str], files: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of `files` (paths inside `root`, e.g. what :func:`fetch_tree`
    returned)."""
    base = Path(root)
    return {Path(f).relative_to(base).as_posix(): file_sha256(f) for f in files}


def tree_digest(hashes: Mapping[str, str]) -> str:
    r"""One sha256 for a tree: over the lines ``<file sha256>  <relative path>\n`` sorted by path.

    That is ``sha256sum``'s own listing, so a local copy can be checked with
    ``(cd DIR && find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs -d '\n' sha256sum) | sha256sum``.
    """
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{hashes[rel]}  {rel}\n".encode())
    return h.hexdigest()


def install() -> None:
    """Let daft_core read ``s3://`` weights and checkpoints through :func:`fetch_file` (safe to repeat)."""
    from daft_core.models import register_opener

    register_opener("s3", fetch_file)

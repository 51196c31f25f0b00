"""The S3 blob store: instance files as objects in an S3-compatible store (AWS S3, MinIO, Ceph,
SeaweedFS...), selected by ``storage.url = "s3://bucket/prefix"``.

What stays local (``LocalStaging``, under ``data_dir``): files are received into the staging
folder as with the file system store, so its free space still limits what can arrive
(``free_bytes``, ``check_room``); ``put`` then streams the staged file to the store (multipart
above ``MULTIPART_BYTES``) and returns only once the store has answered the upload with
success, so a C-STORE is acknowledged only for an object the store holds. Per-key locks are
``flock``s of this host: two nodes ingesting the same instance at once are settled by the
index (the content hash of the row each commits), not by a lock.

Reads go through a bounded cache on local disk (``read_cache.ReadCache``): readers get an open
local file, seekable, and ``local_path`` is None (no ``sendfile`` from an object store).

Every request is retried by botocore (its ``standard`` mode: exponential back-off with jitter,
connection errors, throttling and 5xx answers) up to ``s3.attempts`` tries; after the last one
the error says which store did not answer and why, in words an administrator can act on,
and never with a credential in it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import S3Transfer, TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .base import StorageError, parse_s3_url
from .filesystem import LocalStaging
from .read_cache import ReadCache

MULTIPART_BYTES = 64 << 20  # larger uploads go in parts of this size, four at a time
LIST_PAGE = 1000  # keys per listing request (S3's largest page)
_LISTED_KEY = re.compile(r"[^/]{2}/[^/]{2}/[^/]+\.dcm")  # what iter_keys lists, as FileStore does
_ERROR_CODE = re.compile(r"An error occurred \((\w+)\)")  # botocore's wording of the store's answer
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_REFUSED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"})
T = TypeVar("T")
log = logging.getLogger(__name__)


class S3Options(Protocol):
    """The ``[s3]`` settings (``config.S3Settings``); empty strings defer to boto3's own lookup
    (the ``AWS_*`` environment variables, ``~/.aws``)."""

    endpoint: str
    region: str
    access_key_id: str
    secret_access_key: str
    verify_tls: bool
    ca_bundle: str
    addressing_style: str
    attempts: int
    timeout_s: float
    cache_mb: int


class S3Store(LocalStaging):
    """A ``BlobStore`` in an S3 bucket, with local staging and a local read cache."""

    def __init__(self, url: str, data_dir: Path, options: S3Options) -> None:
        super().__init__(data_dir)
        self.bucket, self.prefix = parse_s3_url(url)
        self._url = url
        # verify: False turns certificate checks off; a path names a CA bundle; None is boto3's
        # default (its own bundle, or AWS_CA_BUNDLE).
        verify: bool | str | None = (options.ca_bundle or None) if options.verify_tls else False
        session = boto3.session.Session()

        def client(attempts: int, timeout: float) -> Any:
            config = Config(
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=min(timeout, 10.0),
                read_timeout=timeout,
                s3={"addressing_style": options.addressing_style},
                max_pool_connections=16,
                # Uploads carry boto3's CRC32 checksum, which the store checks before it answers
                # (a store that refuses these: AWS_REQUEST_CHECKSUM_CALCULATION=when_required).
            )
            return session.client(
                "s3",
                endpoint_url=options.endpoint or None,
                region_name=options.region or None,
                aws_access_key_id=options.access_key_id or None,
                aws_secret_access_key=options.secret_access_key or None,
                verify=verify,
                config=config,
            )

        self._client = client(options.attempts, options.timeout_s)
        # The health check asks once and briefly: /testdbalive must answer within the watchdog's time.
        self._probe_client = client(1, min(options.timeout_s, 5.0))
        self.endpoint = self._client.meta.endpoint_url
        self._transfer = S3Transfer(
            self._client,
            TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES, max_concurrency=4),
        )
        max_bytes = options.cache_mb << 20
        self._cache = ReadCache(self._data_dir / "cache", max_bytes, self._staging) if max_bytes > 0 else None

    def _object(self, key: str) -> str:
        if not _LISTED_KEY.fullmatch(key) or ".." in key:
            raise ValueError(f"not a blob key: {key!r}")
        return self.prefix + key

    def _call(self, what: str, request: Callable[..., T], **params: Any) -> T:
        """``request(**params)``, its failure after botocore's retries turned into a StorageError
        (FileNotFoundError for a missing object)."""
        try:
            return request(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING:
                raise FileNotFoundError(
                    errno.ENOENT, f"no object {params.get('Key', '')} in {self.describe()}"
                ) from None
            raise self._refusal(what, code, str(error.get("Message", "") or exc)) from None
        except NoCredentialsError:
            raise StorageError(
                errno.EACCES,
                f"no credentials for the object store at {self.endpoint}: set s3.access_key_id and "
                "s3.secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            ) from None
        except S3UploadFailedError as exc:  # the store answered an upload with an error (its text names it)
            named = _ERROR_CODE.search(str(exc))
            raise self._refusal(what, named.group(1) if named else "", str(exc)) from None
        except BotoCoreError as exc:
            raise StorageError(
                errno.EIO, f"the object store at {self.endpoint} did not answer ({what}): {exc}"
            ) from None

    def _refusal(self, what: str, code: str, message: str) -> StorageError:
        if code in _REFUSED:
            return StorageError(
                errno.EACCES,
                f"the object store at {self.endpoint} refused to {what} ({code}: {message}): check "
                "s3.access_key_id / s3.secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
                f"and the policy of bucket {self.bucket}",
            )
        if code == "NoSuchBucket":
            return StorageError(
                errno.ENOENT,
                f"the object store at {self.endpoint} has no bucket {self.bucket}: create it, or fix storage.url",
            )
        cause = f"{code}: {message}" if code else message
        return StorageError(errno.EIO, f"the object store at {self.endpoint} failed to {what} ({cause})")

    # -- BlobStore -----------------------------------------------------------------------------
    def put(self, staged: str | Path, key: str) -> None:
        name = self._object(key)
        # Either call returns once the store answered with success (the PUT, or the multipart
        # upload's completion); any other answer raises, after botocore's retries (which rewind
        # the file). One PUT streamed from the file for all but the largest: S3Transfer hands
        # even a one-request upload to its threads, which cost 0.4-0.7 ms of CPU an instance
        # (docs/benchmarks.md, "Two nodes on one PostgreSQL and one S3 store").
        if os.stat(staged).st_size <= MULTIPART_BYTES:
            with open(staged, "rb") as body:
                self._call(f"store {name}", self._client.put_object, Bucket=self.bucket, Key=name, Body=body)
        else:
            self._call(f"store {name}", self._transfer.upload_file, filename=str(staged), bucket=self.bucket, key=name)
        # The object is stored: nothing here may fail the store any more (the cache is a bonus).
        try:
            if self._cache is not None:
                if self._cache.fits(os.stat(staged).st_size):
                    self._cache.adopt(key, staged)  # what was received is what a workstation retrieves next
                    return
                self._cache.discard(key)
        except OSError as exc:
            log.warning("read cache: %s not kept after its upload: %s", key, exc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)

    def open(self, key: str) -> BinaryIO:
        if self._cache is not None:
            cached = self._cache.open(key)
            if cached is not None:
                return cached
        name = self._object(key)
        answer = self._call(f"read {name}", self._client.get_object, Bucket=self.bucket, Key=name)
        size = int(answer["ContentLength"])
        body = answer["Body"]

        def download(fh: BinaryIO) -> None:
            try:
                shutil.copyfileobj(body, fh, 1 << 20)
            except (BotoCoreError, OSError) as exc:
                raise StorageError(
                    errno.EIO, f"the object store at {self.endpoint} broke off sending {name}: {exc}"
                ) from None
            finally:
                body.close()
            if fh.tell() != size:
                raise StorageError(errno.EIO, f"{name}: {fh.tell()} of {size} bytes arrived from {self.endpoint}")

        if self._cache is not None and self._cache.fits(size):
            return self._cache.fill(key, download)
        out = self.scratch()
        try:
            download(out)  # type: ignore[arg-type]
        except BaseException:
            out.close()
            raise
        out.seek(0)
        return out  # type: ignore[return-value]

    def size(self, key: str) -> int | None:
        # Asked of the store itself, never the cache: ingest takes it as the truth of what is
        # stored, and another node may have deleted or replaced the object.
        name = self._object(key)
        try:
            answer = self._call(f"look up {name}", self._client.head_object, Bucket=self.bucket, Key=name)
        except FileNotFoundError:
            return None
        return int(answer["ContentLength"])

    def delete(self, key: str) -> None:
        name = self._object(key)
        if self._cache is not None:
            self._cache.discard(key)
        self._call(f"delete {name}", self._client.delete_object, Bucket=self.bucket, Key=name)

    def local_path(self, key: str) -> None:
        return None

    def iter_keys(self) -> Iterator[str]:
        # A page of up to 1,000 keys at a time, in the store's (ascending) order.
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": LIST_PAGE}
        )
        iterator = iter(pages)
        while True:
            page = self._call(f"list {self._url}", lambda: next(iterator, None))
            if page is None:
                return
            for item in page.get("Contents", ()):
                key = item["Key"][len(self.prefix) :]
                if _LISTED_KEY.fullmatch(key):
                    yield key

    def probe(self) -> None:
        self.probe_staging()
        self._call(f"answer for bucket {self.bucket}", self._probe_client.head_bucket, Bucket=self.bucket)

    def describe(self) -> str:
        return f"objects in {self._url} at {self.endpoint}"

"""The ``BlobStore`` contract, run against both stores: the file system and S3 (SeaweedFS's
real gateway, ``tests/s3gateway.py``); then what only the S3 store has: errors, retries, the
read cache shared by processes, multipart uploads."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from macpacs.pacs_server.storage import (
    BlobStore,
    FileStore,
    KeyLockTimeout,
    StorageError,
    blob_key,
    local_copy,
    open_blob_store,
)
from tests.conftest import free_port
from tests.s3gateway import SECRET_KEY, Gateway
from tests.storage.conftest import s3_settings


@pytest.fixture(params=["files", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "files":
        return FileStore(tmp_path / "data")
    gateway: Gateway = request.getfixturevalue("gateway")
    return open_blob_store(request.getfixturevalue("s3_url"), tmp_path / "data", s3_settings(gateway))  # type: ignore[arg-type]


def staged(store: BlobStore, data: bytes) -> str:
    out = store.stage()
    out.write(data)
    out.close()
    return out.name


def key(n: int) -> str:
    return blob_key(f"1.2.826.0.1.3680043.8.498.{n}")


def test_put_open_size_delete(store: BlobStore) -> None:
    name = staged(store, b"first")
    store.put(name, key(1))
    assert not os.path.exists(name), "put takes the staged file"
    with store.open(key(1)) as fh:
        assert fh.read() == b"first"
        fh.seek(2)  # readers seek (a frame, the dataset after the file meta)
        assert fh.read() == b"rst"
    assert store.size(key(1)) == 5
    store.put(staged(store, b"second one"), key(1))  # replaces
    with store.open(key(1)) as fh:
        assert fh.read() == b"second one"
    assert store.size(key(1)) == 10
    store.delete(key(1))
    store.delete(key(1))  # already gone: nothing happens
    assert store.size(key(1)) is None
    with pytest.raises(FileNotFoundError):
        store.open(key(1))
    with pytest.raises(FileNotFoundError), local_copy(store, key(2)) as path:
        path.read_bytes()


def test_iter_keys_is_every_key_in_order(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from macpacs.pacs_server.storage import s3

    monkeypatch.setattr(s3, "LIST_PAGE", 3)  # several pages of the S3 listing
    keys = sorted(key(n) for n in range(8))
    for k in reversed(keys):
        store.put(staged(store, k.encode()), k)
    listed = store.iter_keys()
    assert next(listed) == keys[0]  # a generator: the first key comes before the rest is listed
    assert [keys[0], *listed] == keys


def test_local_copy_is_the_blob(store: BlobStore) -> None:
    store.put(staged(store, b"DICM-ish"), key(3))
    with local_copy(store, key(3)) as path:
        assert path.read_bytes() == b"DICM-ish"
        copied = store.local_path(key(3)) is None
    assert path.exists() != copied, "a staged copy is removed after use, the stored file stays"


def test_lock_is_held_across_threads_and_times_out(store: BlobStore) -> None:
    order: list[str] = []
    with store.lock(key(4), 5):
        worker = threading.Thread(target=lambda: _hold(store, order))
        worker.start()
        time.sleep(0.2)
        order.append("first")
    worker.join()
    assert order == ["first", "second"]
    with store.lock(key(4), 5):
        failed: list[BaseException] = []
        thread = threading.Thread(target=lambda: _try_lock(store, failed))
        thread.start()
        thread.join()
    assert isinstance(failed[0], KeyLockTimeout)


def _hold(store: BlobStore, order: list[str]) -> None:
    with store.lock(key(4), 5):
        order.append("second")


def _try_lock(store: BlobStore, failed: list[BaseException]) -> None:
    try:
        with store.lock(key(4), 0.2):
            pass
    except KeyLockTimeout as exc:
        failed.append(exc)


def test_local_staging_space_is_what_limits_receiving(store: BlobStore) -> None:
    assert store.free_bytes() > 0
    store.check_room()
    store.keep_free(store.free_bytes() + (1 << 40))
    with pytest.raises(StorageError) as caught:
        store.check_room()
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(StorageError):
        store.stage().write(b"x")
    store.keep_free(0)


def test_clean_staging_removes_what_a_dead_writer_left(store: BlobStore) -> None:
    left = store.stage()
    left.close()
    dead = Path(left.name).with_name("in-999999999-dead.part")
    os.rename(left.name, dead)
    alive = store.stage()
    assert store.clean_staging() == 1
    assert not dead.exists() and os.path.exists(alive.name)
    alive.discard()


def test_probe_and_describe(store: BlobStore) -> None:
    store.probe()
    assert store.describe()


# -- the S3 store alone ---------------------------------------------------------------------------
def test_a_store_that_does_not_answer_is_a_clear_error(tmp_path: Path, gateway: Gateway) -> None:
    port = free_port()  # nothing listens there
    settings = s3_settings(gateway, endpoint=f"http://127.0.0.1:{port}", attempts=2, timeout_s=2.0)
    store = open_blob_store("s3://macpacs/x", tmp_path / "data", settings)  # type: ignore[arg-type]
    started = time.monotonic()
    for call in (lambda: store.put(staged(store, b"x"), key(5)), lambda: store.size(key(5)), store.probe):
        with pytest.raises(StorageError) as caught:
            call()
        text = str(caught.value)
        assert f"the object store at http://127.0.0.1:{port} did not answer" in text, text
        assert SECRET_KEY not in text
    assert time.monotonic() - started < 30


class _CuttingProxy:
    """A TCP relay to the gateway that closes its first ``cuts`` connections once ``after`` bytes of
    the request have come in (a network that fails mid-upload), and relays the later ones."""

    def __init__(self, target: int, cuts: int, after: int) -> None:
        self.target, self.cuts, self.after = target, cuts, after
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            cut = self.connections <= self.cuts
            threading.Thread(target=self._cut if cut else self._relay, args=(client,), daemon=True).start()

    def _cut(self, client: socket.socket) -> None:
        received = 0
        while received < self.after:
            chunk = client.recv(65536)
            if not chunk:
                break
            received += len(chunk)
        client.close()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pump(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := source.recv(65536):
                    sink.sendall(chunk)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(10)
        upstream.close()
        client.close()

    def close(self) -> None:
        self.listener.close()


def test_an_upload_cut_off_mid_way_is_sent_again_whole(tmp_path: Path, gateway: Gateway, s3_url: str) -> None:
    """botocore's retry sends the PUT again from the staged file's start: the object is whole."""
    proxy = _CuttingProxy(int(gateway.endpoint.rsplit(":", 1)[1]), cuts=1, after=100_000)
    try:
        settings = s3_settings(gateway, endpoint=f"http://127.0.0.1:{proxy.port}", attempts=3, cache_mb=0)
        store = open_blob_store(s3_url, tmp_path / "data", settings)  # type: ignore[arg-type]
        data = os.urandom(600_000)  # larger than a CT slice, sent in several segments before the cut
        store.put(staged(store, data), key(9))
        assert proxy.connections >= 2, "the first connection was cut, so the PUT went again"
        assert store.size(key(9)) == len(data)
        with store.open(key(9)) as fh:
            assert fh.read() == data
    finally:
        proxy.close()


def test_wrong_credentials_are_named_without_the_secret(tmp_path: Path, gateway: Gateway, s3_url: str) -> None:
    settings = s3_settings(gateway, secret_access_key="wrong-" + SECRET_KEY)
    store = open_blob_store(s3_url, tmp_path / "data", settings)  # type: ignore[arg-type]
    with pytest.raises(StorageError) as caught:
        store.put(staged(store, b"x"), key(6))
    text = str(caught.value)
    assert caught.value.errno == errno.EACCES and "s3.secret_access_key" in text, text
    assert SECRET_KEY not in text and SECRET_KEY not in repr(settings)


def test_credentials_from_the_aws_environment(
    tmp_path: Path, gateway: Gateway, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from macpacs.pacs_server.config import S3Settings

    for name, value in gateway.env().items():
        monkeypatch.setenv(name, value)
    store = open_blob_store(s3_url, tmp_path / "data", S3Settings())  # type: ignore[arg-type]
    store.put(staged(store, b"env"), key(7))
    assert store.size(key(7)) == 3
    assert gateway.endpoint in store.describe()


def test_multipart_upload(tmp_path: Path, gateway: Gateway, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from macpacs.pacs_server.storage import s3

    monkeypatch.setattr(s3, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part
    store = open_blob_store(s3_url, tmp_path / "data", s3_settings(gateway, cache_mb=0))  # type: ignore[arg-type]
    data = os.urandom(1 << 20) * 12
    store.put(staged(store, data), key(8))
    bucket, _, prefix = s3_url[len("s3://") :].partition("/")
    head = gateway.client().head_object(Bucket=bucket, Key=f"{prefix}/{key(8)}")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-3"'), head["ETag"]  # three parts
    with store.open(key(8)) as fh:
        assert fh.read() == data


def _cache_bytes(data: Path) -> int:
    return sum(p.stat().st_size for p in (data / "cache").glob("??/??/*.dcm"))


def test_read_cache_is_bounded_and_evicts_the_least_recently_used(
    tmp_path: Path, gateway: Gateway, s3_url: str
) -> None:
    data = tmp_path / "data"
    store = open_blob_store(s3_url, data, s3_settings(gateway, cache_mb=1))  # type: ignore[arg-type]
    blobs = {key(n): os.urandom(200_000) for n in range(12)}
    for k, value in blobs.items():
        store.put(staged(store, value), k)
        assert _cache_bytes(data) <= 1 << 20
    first = next(iter(blobs))
    assert not (data / "cache" / first).exists(), "the oldest went first"
    held = store.open(list(blobs)[-1])  # an open copy survives its eviction
    for k, value in blobs.items():  # read back (downloaded again where evicted), still bounded
        with store.open(k) as fh:
            assert fh.read() == value
        assert _cache_bytes(data) <= 1 << 20
    assert held.read() == list(blobs.values())[-1]
    held.close()


def _reader(url: str, data: str, endpoint: str, keys: list[str], out: Any) -> None:
    from macpacs.pacs_server.config import S3Settings
    from tests.s3gateway import ACCESS_KEY

    settings = S3Settings(endpoint=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, cache_mb=1)
    store = open_blob_store(url, Path(data), settings)
    digests = []
    for _round in range(3):
        for k in keys:
            with store.open(k) as fh:
                digests.append((k, len(fh.read())))
    out.put(digests)


def test_read_cache_is_shared_by_processes(tmp_path: Path, gateway: Gateway, s3_url: str) -> None:
    """DICOM workers are processes of their own: two fill and evict one cache at once."""
    data = tmp_path / "data"
    writer = open_blob_store(s3_url, data, s3_settings(gateway, cache_mb=0))  # type: ignore[arg-type]
    keys = [key(100 + n) for n in range(10)]
    for k in keys:
        writer.put(staged(writer, b"x" * 150_000), k)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_reader, args=(s3_url, str(data), gateway.endpoint, keys[n::2] + keys, out))
        for n in range(2)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert all(size == 150_000 for got in results for _k, size in got)
    assert _cache_bytes(data) <= 1 << 20
    assert list((data / "tmp").iterdir()) == [], "no partial download left"

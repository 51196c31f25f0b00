"""DICOMweb (QIDO-RS) query parameters against a real ``macpacs serve``, generated: never a 500.

Parameter names are keywords, tags, QIDO's own (``includefield``, ``limit``, ``offset``,
``fuzzymatching``) or any text; values any text, numbers past every limit, ranges and lists; paths
carry generated UIDs. Every answer is 200 with DICOM JSON, 204, or a 4xx that says what was wrong,
and each comes within seconds.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import pytest
import requests
from hypothesis import event, given
from hypothesis import strategies as st

from macpacs.pacs_server.index.attributes import ATTRIBUTES
from tests.conftest import ServerProcess, free_port, run_tool
from tests.synthetic import write_series

from .profiles import fuzz

NAMES = [attr.keyword for attr in ATTRIBUTES] + ["00100010", "00100020", "0020000D", "00080061", "7FE00010", "FFFFFFFF"]
CONTROL = ["includefield", "limit", "offset", "fuzzymatching", "IncludeField", "LIMIT"]
special = st.sampled_from(["*", "?", "-", "\\", ",", "^", "%", "_", "!", "'", " ", "\x00", "%", "é", "中", "\ud800"])

known = st.sampled_from(NAMES + CONTROL)
name = st.one_of(known, known, known, st.text(max_size=12))  # mostly names QIDO knows
param_value = st.one_of(
    st.text(st.one_of(special, st.characters()), max_size=40),
    st.integers(-(2**80), 2**80).map(str),
    st.sampled_from(["true", "false", "all", "TRUE", "", "1e3", "0x10", "-0", "20240101-", "-", "1.2.3\\4.5"]),
    st.from_regex(r"\A\d{8}-\d{8}\Z"),
)


def segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


top = st.sampled_from(["/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances"])
path = st.one_of(
    top,
    top,
    st.text(max_size=20).map(lambda uid: f"/dicom-web/studies/{segment(uid)}/series"),
    st.tuples(st.text(max_size=10), st.text(max_size=10)).map(
        lambda t: f"/dicom-web/studies/{segment(t[0])}/series/{segment(t[1])}/instances"
    ),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz-dicomweb")
    srv = ServerProcess(root / "data", free_port(), free_port(), free_port()).start()
    write_series(root / "s", 3, size=4, patient_name="DOE^JOHN", patient_id="P1")
    run_tool("storescu", *srv.dicom_args(), "+sd", str(root / "s"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def check(response: requests.Response) -> None:
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, (response.status_code, response.request.url, response.text[:500])
    if response.status_code == 200:
        assert isinstance(response.json(), list)
    elif response.status_code >= 400:
        assert response.text  # a reason, not an empty error


@fuzz(80)
@given(where=path, params=st.lists(st.tuples(name, param_value), max_size=6))
def test_qido_parameters_never_fail_the_server(server: ServerProcess, session, where: str, params) -> None:
    # Lone surrogates cannot travel in a URL: percent-encode what a client could send (UTF-8, or raw bytes).
    query = "&".join(
        f"{urllib.parse.quote(k.encode('utf-8', 'surrogatepass'), safe='')}="
        f"{urllib.parse.quote(v.encode('utf-8', 'surrogatepass'), safe='')}"
        for k, v in params
    )
    url = f"http://127.0.0.1:{server.web_port}{where}" + (f"?{query}" if query else "")
    check(session.get(url, headers={"Accept": "application/dicom+json"}, timeout=30))


@fuzz(40)
@given(raw=st.binary(max_size=60))
def test_raw_query_bytes_never_fail_the_server(server: ServerProcess, session, raw: bytes) -> None:
    query = urllib.parse.quote_from_bytes(raw, safe="=&")
    check(session.get(f"http://127.0.0.1:{server.web_port}/dicom-web/studies?{query}", timeout=30))

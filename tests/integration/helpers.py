"""Shared by the integration tests: a server with the integration plugins, worklist items, HL7 messages.

Worklist items are pydicom datasets; ``dump`` writes one in DCMTK's dump format, which
``dump2dcm`` turns into the ``.wl`` file DCMTK's own worklist server (``wlmscpfs``) serves.
HL7 messages are built field by field (``segment``), so that a field's number is written once.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.conftest import MACPACS, ServerProcess, dcmtk, free_port, run_tool, wait_for_port

ADMIN = ("wladmin", "worklist-admin-password")
PLUGINS = ["hl7", "worklist", "mpps", "storage-commitment"]


def start_integration_server(
    folder: Path, *, extra: str = "", site: Path | None = None, more: tuple[str, ...] = ()
) -> ServerProcess:
    """A real ``macpacs serve`` in ``folder`` with the four integration plugins, an admin user and
    its own HL7 port (``server.hl7_port``); with ``site`` on PYTHONPATH and the plugins ``more``
    enabled too. The caller stops it."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [MACPACS, "users", "add", ADMIN[0], "--password-stdin", "--data-dir", str(data)],
        input=ADMIN[1] + "\n",
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )
    hl7_port = free_port()
    config = folder / "macpacs.toml"
    enable = ", ".join(f'"{name}"' for name in (*PLUGINS, *more))
    config.write_text(f"[plugins]\nenable = [{enable}]\n\n[plugins.hl7]\nport = {hl7_port}\n{extra}")
    server = ServerProcess(
        data_dir=data,
        dicom_port=free_port(),
        web_port=free_port(),
        xmlrpc_port=free_port(),
        extra_args=["--config", str(config)],
        env={"PYTHONPATH": str(site)} if site else {},
    ).start()
    server.hl7_port = hl7_port  # type: ignore[attr-defined]
    wait_for_port(hl7_port, timeout=20)
    return server


@contextlib.contextmanager
def integration_server(folder: Path, **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_integration_server(folder, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# -- worklist items -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    patient_name: str
    patient_id: str
    accession: str
    station_ae: str
    modality: str
    date: str
    time: str
    sps_id: str
    birth_date: str = "19700101"
    sex: str = "O"
    physician: str = "TECH^ONE"
    description: str = "EXAM"
    study_uid: str = ""


def item(step: Step) -> Dataset:
    """A complete worklist item (every attribute wlmscpfs wants in its files, PS3.4 K.6.1.2.2)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = step.accession
    ds.ReferringPhysicianName = "REFERRER^A"
    ds.PatientName = step.patient_name
    ds.PatientID = step.patient_id
    ds.PatientBirthDate = step.birth_date
    ds.PatientSex = step.sex
    ds.StudyInstanceUID = step.study_uid or pydicom.uid.generate_uid()
    ds.RequestedProcedureDescription = step.description
    ds.RequestedProcedureID = "RP" + step.sps_id
    ds.RequestedProcedurePriority = "ROUTINE"
    sps = Dataset()
    sps.ScheduledStationAETitle = step.station_ae
    sps.ScheduledProcedureStepStartDate = step.date
    sps.ScheduledProcedureStepStartTime = step.time
    sps.Modality = step.modality
    sps.ScheduledPerformingPhysicianName = step.physician
    sps.ScheduledProcedureStepDescription = step.description
    sps.ScheduledStationName = "STATION"
    sps.ScheduledProcedureStepLocation = "ROOM1"
    sps.ScheduledProcedureStepID = step.sps_id
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds


def dump(ds: Dataset, indent: str = "") -> str:
    """``ds`` in DCMTK's dump format (dump2dcm's input)."""
    lines = []
    for element in ds:
        tag = f"({element.tag.group:04x},{element.tag.element:04x})"
        if element.VR == "SQ":
            lines.append(f"{indent}{tag} SQ (Sequence with undefined length)")
            for child in element.value:
                lines.append(f"{indent}  (fffe,e000) na (Item with undefined length)")
                lines.append(dump(child, indent + "    "))
                lines.append(f"{indent}  (fffe,e00d) na (ItemDelimitationItem)")
            lines.append(f"{indent}(fffe,e0dd) na (SequenceDelimitationItem)")
        else:
            value = element.value
            text = (
                "\\".join(map(str, value)) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else value
            )
            lines.append(f"{indent}{tag} {element.VR} [{text}]")
    return "\n".join(lines)


@contextlib.contextmanager
def wlmscpfs(items: list[Dataset], folder: Path, ae_title: str = "WLMSCP") -> Iterator[tuple[str, int]]:
    """DCMTK's worklist server over ``items`` (written as .wl files with dump2dcm): yields (AE, port)."""
    base = folder / "worklists"
    ae_dir = base / ae_title
    ae_dir.mkdir(parents=True)
    (ae_dir / "lockfile").write_text("")
    for number, ds in enumerate(items):
        text = ae_dir / f"item{number}.dump"
        text.write_text(dump(ds) + "\n", encoding="latin-1")
        run_tool("dump2dcm", str(text), str(ae_dir / f"item{number}.wl"))
        text.unlink()
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("wlmscpfs"), "-dfp", str(base), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, timeout=20, proc=proc)  # type: ignore[arg-type]
        yield ae_title, port
    finally:
        proc.kill()
        proc.wait()


def findscu_worklist(ae_title: str, port: int, out_dir: Path, *keys: str) -> list[Dataset]:
    """DCMTK ``findscu -W`` (Modality Worklist model); the responses read back with pydicom."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    args = ["-W", "-X", "-od", str(out_dir), "-aec", ae_title, "127.0.0.1", str(port)]
    for key in keys:
        args += ["-k", key]
    run_tool("findscu", *args)
    return [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


def flat(ds: Dataset) -> dict[str, Any]:
    """A response as {keyword: value}, sequence items flattened as keyword.keyword (for comparisons)."""
    out: dict[str, Any] = {}
    for element in ds:
        if element.keyword in ("SpecificCharacterSet",) or element.tag.group == 0x0002:
            continue
        if element.VR == "SQ":
            for number, child in enumerate(element.value):
                for key, value in flat(child).items():
                    out[f"{element.keyword}[{number}].{key}"] = value
        else:
            value = element.value
            out[element.keyword] = "" if value is None else str(value)
    return out


def post_item(server: ServerProcess, ds: Dataset) -> dict[str, Any]:
    response = requests.post(
        f"http://127.0.0.1:{server.web_port}/api/worklist", json=ds.to_json_dict(), auth=ADMIN, timeout=10
    )
    assert response.status_code == 201, response.text
    return response.json()


# -- HL7 ------------------------------------------------------------------------------------------
def segment(name: str, fields: Mapping[int, str]) -> str:
    """One segment with ``fields`` by HL7 field number (MSH-1 is the field separator itself)."""
    last = max(fields) if fields else 0
    values = [fields.get(n, "") for n in range(1, last + 1)]
    if name == "MSH":
        return "MSH|^~\\&|" + "|".join(values[2:])
    return "|".join([name, *values])


def msh(control_id: str, kind: str, when: str = "20250101120000") -> str:
    return segment(
        "MSH",
        {3: "RIS", 4: "HOSPITAL", 5: "MACPACS", 6: "RADIOLOGY", 7: when, 9: kind, 10: control_id, 11: "P", 12: "2.5"},
    )


def message(*segments: str) -> str:
    return "\r".join(segments) + "\r"


def orm(
    control_id: str,
    control: str,
    order: str,
    *,
    patient_id: str = "P100",
    name: str = "DOE^JOHN",
    accession: str = "ACC100",
    station: str = "CT01",
    modality: str = "CT",
    start: str = "202501011000",
    sps_id: str = "SPS100",
    when: str = "20250101120000",
    order_status: str = "SC",
) -> str:
    """An ORM^O01 (IHE field use: OBR-18 accession, OBR-20 step ID, OBR-21 station AE, OBR-24 modality)."""
    return message(
        msh(control_id, "ORM^O01^ORM_O01", when),
        segment("PID", {1: "1", 3: f"{patient_id}^^^HOSP^MR", 5: name, 7: "19800202", 8: "F"}),
        segment("PV1", {1: "1", 2: "O", 8: "D1^REFERRER^ANNA"}),
        segment("ORC", {1: control, 2: order, 3: "F" + order, 5: order_status}),
        segment(
            "OBR",
            {
                1: "1",
                2: order,
                3: "F" + order,
                4: "CTHEAD^CT HEAD^L",
                18: accession,
                19: "RP" + sps_id,
                20: sps_id,
                21: station,
                24: modality,
                27: "^^^" + start,
            },
        ),
    )


def send_mllp(port: int, *texts: str) -> list[str]:
    """Send messages with the hl7 library's own client (``hl7.client.MLLPClient``); the ACK texts."""
    import hl7.client

    acks = []
    with hl7.client.MLLPClient("127.0.0.1", port) as client:
        for text in texts:
            acks.append(_unwrap(client.send_message(text)))
    return acks


def _unwrap(block: bytes) -> str:
    return block.strip(b"\x0b\x1c\r\n").decode("utf-8") + "\r"


def ack_code(ack: str) -> tuple[str, str]:
    """MSA-1 and MSA-3 (unescaped) of an ACK, read with the hl7 library."""
    import hl7

    parsed = hl7.parse(ack)
    return str(parsed["MSA.F1"]), str(parsed["MSA.F3"])


def wait_until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)

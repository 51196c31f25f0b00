"""Orthanc (Debian package ``orthanc``) as a peer on loopback: one configuration for the Q/R
tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORTHANC = "/usr/sbin/Orthanc"


def orthanc_config(workdir: Path, *, aet: str, dicom_port: int, http_port: int, **settings: Any) -> dict[str, Any]:
    """Orthanc's configuration: its database and files under ``workdir/db``, the REST API on
    loopback without authentication, any called AE title, files stored uncompressed, and
    C-FIND/C-GET/C-MOVE answered for peers not declared in ``DicomModalities`` (DCMTK clients).
    ``settings`` add to or override these."""
    return {
        "Name": "macpacs-peer",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "StorageCompression": False,
        "ConcurrentJobs": 2,
        "Plugins": [],
        **settings,
    }

"""The ceiling for any pynetdicom-based server: a storage SCP that only writes
``event.encoded_dataset()`` to a file (no parsing, no index, no fsync).

Usage: python bench/bare_scp.py PORT OUT_DIR
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

port, out = int(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)


def handle_store(event: evt.Event) -> int:
    with open(out / f"{uuid.uuid4().hex}.dcm", "wb") as fh:
        fh.write(event.encoded_dataset())
    return 0x0000


ae = AE(ae_title="BARE")
ae.maximum_associations = 100
for context in StoragePresentationContexts:
    ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle_store)])

"""A bare pynetdicom Storage SCP: the ceiling of any node built on pynetdicom.

``bench_ingest.py`` runs it beside ``storescp`` and the node, so each run shows how much of
the node's time is pynetdicom's own receive path and how much is the node's work:

    python benchmarks/bare_scp.py PORT {nothing,write} [--folder DIR]

``nothing``: the C-STORE handler answers Success at once (no file, no index).
``write``: it writes ``event.encoded_dataset()`` to a file in ``--folder`` and closes it
(page cache only, no fsync, no index; what storescp does).

Both use the node's association settings: unlimited maximum PDU size (DCMTK then sends
128 KiB PDUs), TCP_NODELAY on the accepted socket, pynetdicom's log handlers off.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import sys
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from dicom_node.dicom.pynetdicom_private import quiet_standard_handlers

EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("handler", choices=("nothing", "write"))
    parser.add_argument("--folder", type=Path, help="where 'write' puts the files")
    args = parser.parse_args()
    if args.handler == "write" and args.folder is None:
        parser.error("'write' needs --folder")

    quiet_standard_handlers()
    numbers = itertools.count()

    def on_open(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_store(event: evt.Event) -> int:
        if args.handler == "write":
            (args.folder / f"{next(numbers)}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE("BARE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage, [EXPLICIT_LE, IMPLICIT_LE])
    ae.start_server(
        ("127.0.0.1", args.port),
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

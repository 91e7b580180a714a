"""Real services started by tests on free loopback ports: Orthanc, PostgreSQL, Redis.

Each starts in its own temporary folder and stops (waiting for the process to exit) on
``stop()``; a missing binary fails under ``CI=true`` (see :mod:`tests.support`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7
import httpx
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server

from tests.support import free_port, missing_component, require_binary

ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Orthanc:
    """A real Orthanc with the DICOMweb plugin, its own config, storage and ports."""

    folder: Path
    aet: str = "ORTHANC"
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    lua: str | None = None
    stable_age_s: int = 2
    extra_config: dict[str, Any] = field(default_factory=dict)  # e.g. {"SyncStorageArea": False}
    environment: dict[str, str] | None = None  # e.g. dcmtk_env(): TCP_NODELAY for its DICOM side
    user: str = "test"
    password: str = "test-password"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30)

    def start(self) -> Orthanc:
        binary = require_binary("Orthanc")
        if not os.path.exists(ORTHANC_DICOMWEB_PLUGIN):
            missing_component(f"Orthanc DICOMweb plugin {ORTHANC_DICOMWEB_PLUGIN}")
        self.folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "spine-triage-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomModalities": self.modalities,
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
            "StableAge": self.stable_age_s,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Host": f"127.0.0.1:{self.http_port}",
            },
            "UserMetadata": {
                "TriagePriority": 1024,
                "TriageStatus": 1025,
                "TriageProbability": 1026,
            },
            "DicomScuTimeout": 10,
            "HttpTimeout": 30,
        }
        if self.lua is not None:
            script = self.folder / "hooks.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        config.update(self.extra_config)
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [binary, f"--logdir={logs}", str(self.folder / "orthanc.json")],
            env=self.environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {logs}")
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("Orthanc did not start within 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (initdb + pg_ctl as the postgres user)."""

    folder: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.strip()}")

    def init(self) -> ThrowawayPostgres:
        if not (PG_BIN / "initdb").exists():
            missing_component(f"PostgreSQL server binaries in {PG_BIN}")
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        return self.start()

    def start(self) -> ThrowawayPostgres:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.folder / "data"),
            "-w",
            "-o",
            options,
            "-l",
            str(self.folder / "server.log"),
            "start",
        )
        return self

    def stop(self) -> None:
        if (self.folder / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-w", "-m", "fast", "stop")


@dataclass
class ThrowawayRedis:
    """A Redis server of the test's own: no persistence, so a restart loses every message."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ThrowawayRedis:
        binary = require_binary("redis-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@dataclass
class MllpListener:
    """A RIS stand-in: records every message and answers as the test sets ``mode``.

    ``mode``: an acknowledgment code (``AA``, ``AE``, ``AR``), ``silent`` (never answers),
    ``garbled`` (answers a block that is not HL7) or ``foreign`` (an AA for another message).
    """

    mode: str = "AA"
    reason: str = ""
    received: list[hl7.Message] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _server: Any = None
    _thread: threading.Thread | None = None

    def start(self) -> MllpListener:
        ready: Future[int] = Future()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await start_hl7_server(self._handle, "127.0.0.1", 0, encoding="utf-8")
            ready.set_result(self._server.sockets[0].getsockname()[1])

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="mllp-listener", daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=10)
        return self

    async def _handle(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        try:
            while True:
                block = await reader.readblock()
                text = block.decode("utf-8")
                self.raw.append(text)
                message = hl7.parse(text)
                self.received.append(message)
                if self.mode == "silent":
                    continue
                if self.mode == "garbled":
                    writer.writeblock(b"\x00\x01 this is not HL7")
                elif self.mode == "foreign":
                    ack = message.create_ack("AA")
                    ack.segment("MSA").assign_field("SOMETHING-ELSE", 2)
                    writer.writemessage(ack)
                else:
                    ack = message.create_ack(self.mode)
                    if self.reason:
                        ack.segment("MSA").assign_field(ack.escape(self.reason), 3)
                    writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:
            return  # the sender closed the connection after its ACK
        finally:
            writer.close()

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

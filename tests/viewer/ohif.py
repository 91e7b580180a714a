"""The OHIF viewer for tests: its built ``dist/`` served by Orthanc, and a headless driver.

``.ci/test`` installs what this needs into ``var/ohif/`` (ignored by git): the npm package
``@ohif/app`` (its ``package/dist/``, the viewer as built by its maintainers) and
``playwright-core`` (which drives Debian's ``/usr/bin/chromium``; nothing is downloaded).

The build expects to live at ``/``; Orthanc's ServeFolders plugin serves it under ``/ohif``
next to Orthanc's own DICOMweb (one origin, so no CORS). :func:`prepare_site` makes the copy
that works there (``../shared/COMPONENTS.md`` has the facts): webpack's public path, the
``src``/``href`` and ``PUBLIC_URL`` of ``index.html`` and the font URLs of ``app.bundle.css``
point under ``/ohif/``, the service worker is left out, ``index.html`` is also the file
``viewer`` (ServeFolders has no single-page-app fallback), and ``app-config.js`` names one
data source: Orthanc's DICOMweb on the same origin. Files that need no change are symbolic
links into the package, so a copy takes well under a second.

:func:`run_driver` runs ``ohif_driver.mjs`` with Node.js and returns the JSON it prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.services import ORTHANC_DICOMWEB_PLUGIN, Orthanc
from tests.support import missing_component, require_binary

ROOT = Path(__file__).resolve().parents[2]
OHIF_HOME = Path(os.environ.get("SPINE_TRIAGE_TEST_OHIF_DIR", ROOT / "var" / "ohif"))
OHIF_DIST = OHIF_HOME / "package" / "dist"
PLAYWRIGHT = OHIF_HOME / "node_modules" / "playwright-core"
DRIVER = Path(__file__).with_name("ohif_driver.mjs")
CHROMIUM = "/usr/bin/chromium"
SERVE_FOLDERS_PLUGIN = "/usr/share/orthanc/plugins/libServeFolders.so"
SUB_PATH = "/ohif"

_PUBLIC_PATH = '__webpack_require__.p = "/";'
_EXTENSIONS = {
    "": "text/html",  # the copy of index.html named "viewer"
    ".html": "text/html",
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

APP_CONFIG = """window.config = {
  routerBasename: '%(sub_path)s',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test PACS)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        supportsStow: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


def require_viewer() -> None:
    """Fail (CI) or skip when OHIF's package, playwright-core, Node.js or Chromium is missing."""
    if not (OHIF_DIST / "index.html").is_file():
        missing_component(f"the OHIF viewer package in {OHIF_DIST} (installed by .ci/test)")
    if not (PLAYWRIGHT / "package.json").is_file():
        missing_component(f"playwright-core in {PLAYWRIGHT} (installed by .ci/test)")
    if not os.access(CHROMIUM, os.X_OK):
        missing_component(f"Chromium at {CHROMIUM}")
    if not os.path.exists(SERVE_FOLDERS_PLUGIN):
        missing_component(f"Orthanc ServeFolders plugin {SERVE_FOLDERS_PLUGIN}")
    require_binary("node")


def prepare_site(target: Path, dist: Path = OHIF_DIST, sub_path: str = SUB_PATH) -> Path:
    """A copy of OHIF's ``dist`` that works under ``sub_path`` (see the module's docstring)."""
    target.mkdir(parents=True, exist_ok=True)
    prefix = sub_path.rstrip("/") + "/"
    for entry in dist.iterdir():
        name = entry.name
        if name in {"index.html", "app-config.js", "sw.js", "init-service-worker.js"}:
            continue
        destination = target / name
        text: str | None = None
        if entry.suffix == ".js" and ".bundle." in name:
            content = entry.read_text(encoding="utf-8")
            if _PUBLIC_PATH in content:
                text = content.replace(_PUBLIC_PATH, f'__webpack_require__.p = "{prefix}";')
        elif name == "app.bundle.css":
            text = re.sub(r"url\(/", f"url({prefix}", entry.read_text(encoding="utf-8"))
        if text is not None:
            destination.write_text(text, encoding="utf-8")
        else:
            destination.symlink_to(entry)
    index = (dist / "index.html").read_text(encoding="utf-8")
    index = re.sub(r"<script[^>]*init-service-worker\.js[^>]*></script>", "", index)
    index = re.sub(r'(src|href)="/(?!/)', rf'\1="{prefix}', index)
    index = index.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"')
    for name in ("index.html", "viewer"):
        (target / name).write_text(index, encoding="utf-8")
    (target / "app-config.js").write_text(APP_CONFIG % {"sub_path": sub_path.rstrip("/")})
    return target


def viewer_orthanc_config(site: Path, http_port: int, sub_path: str = SUB_PATH) -> dict[str, Any]:
    """Orthanc configuration that serves ``site`` under ``sub_path`` beside DICOMweb."""
    return {
        "Plugins": [ORTHANC_DICOMWEB_PLUGIN, SERVE_FOLDERS_PLUGIN],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Host": f"127.0.0.1:{http_port}",
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
        "ServeFolders": {
            "Folders": {sub_path: str(site)},
            "Extensions": _EXTENSIONS,
            "AllowCache": True,
            "GenerateETag": True,
        },
    }


def start_viewer_orthanc(folder: Path, site: Path, **options: Any) -> Orthanc:
    """A real Orthanc that serves OHIF (``site``) under ``/ohif`` and its own DICOMweb."""
    server = Orthanc(folder, **options)
    server.extra_config = {
        **server.extra_config,
        **viewer_orthanc_config(site, server.http_port),
    }
    return server.start()


@dataclass(frozen=True)
class DriverRun:
    """What one run of the driver printed (its last line, JSON) and its log."""

    result: dict[str, Any]
    log: str


def run_driver(orthanc: Orthanc, request: dict[str, Any], *, timeout_s: float = 150) -> DriverRun:
    """Run ``ohif_driver.mjs`` on ``request`` (plus the viewer's base URL and credentials)."""
    node = require_binary("node")
    body = {
        "base": orthanc.url,
        "username": orthanc.user,
        "password": orthanc.password,
        "chromium": CHROMIUM,
        "playwright": str(PLAYWRIGHT / "index.mjs"),
        **request,
    }
    done = subprocess.run(
        [node, str(DRIVER), json.dumps(body)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=OHIF_HOME,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise AssertionError(
            f"the OHIF driver failed ({done.returncode})\n{done.stdout[-4000:]}\n"
            f"{done.stderr[-4000:]}"
        )
    return DriverRun(json.loads(lines[-1]), done.stderr)

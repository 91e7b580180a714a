"""DICOMweb client: STOW-RS store, QIDO-RS search and WADO-RS retrieve, on ``dicomweb-client``.

A thin layer over :class:`dicomweb_client.DICOMwebClient` that adds what the node needs:

- authentication by HTTP basic auth or a bearer token, an optional CA bundle, and a timeout on
  every request;
- one attempt per call (the library's own retry loop is switched off: the outbox retries with
  backoff, a destination never sleeps);
- failures as :class:`DicomwebError` with ``transient`` set: a connection error, a timeout,
  HTTP 5xx, 408 and 429 are transient; other 4xx (401/403 included: a wrong password does not
  heal by itself) are permanent. A STOW-RS answer's Failed SOP Sequence is read: failure
  reasons 0xA7xx (out of resources) and 0x0110 (processing failure) are transient, the others
  permanent; warnings count as stored;
- retrieval that hands each instance, as DICOM Part-10 bytes in the transfer syntax the
  server holds it in, to a caller's ``store(bytes)`` callback, so a study can be pulled into
  the node's own file store without sitting in memory as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.errors import InvalidDicomError

from dicom_node.dicom.scu import status_kind

logger = logging.getLogger(__name__)

ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
TRANSIENT_HTTP_STATUSES = frozenset({408, 429})


class DicomwebError(Exception):
    """A DICOMweb request that did not succeed; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool, http_status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.http_status = http_status


@dataclass(frozen=True)
class DicomwebEndpoint:
    """A DICOMweb service: base URL (e.g. ``https://pacs/dicom-web``) and credentials."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)
    ca_certificates: Path | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"a DICOMweb URL starts with http:// or https://: {self.url!r}")
        if self.bearer_token and (self.username or self.password):
            raise ValueError("give either a username and password or a bearer token, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("basic authentication needs both a username and a password")
        if self.timeout_s <= 0:
            raise ValueError("the timeout must be positive")


@dataclass(frozen=True)
class StowOutcome:
    """What a STOW-RS server accepted: stored SOP Instance UIDs and any warning reasons."""

    stored_sop_instance_uids: tuple[str, ...]
    warnings: tuple[tuple[str, int], ...] = ()  # (SOP Instance UID, Warning Reason)
    retrieve_url: str | None = None


def make_session(endpoint: DicomwebEndpoint) -> requests.Session:
    """A ``requests`` session that authenticates to ``endpoint`` as configured."""
    session = requests.Session()
    if endpoint.bearer_token:
        session.headers["Authorization"] = f"Bearer {endpoint.bearer_token}"
    elif endpoint.username is not None and endpoint.password is not None:
        session.auth = (endpoint.username, endpoint.password)
    if endpoint.ca_certificates is not None:
        session.verify = str(endpoint.ca_certificates)
    return session


class DicomwebPeer:
    """One DICOMweb service; usable as a context manager (closes its HTTP session)."""

    def __init__(self, endpoint: DicomwebEndpoint) -> None:
        self.endpoint = endpoint
        self._session = make_session(endpoint)
        self._client = DICOMwebClient(
            endpoint.url.rstrip("/"),
            session=self._session,
            timeout=(endpoint.timeout_s, endpoint.timeout_s),
        )
        self._client.set_http_retry_params(retry=False)

    def __enter__(self) -> DicomwebPeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    # --- STOW-RS ---------------------------------------------------------------------------
    def store_instances(
        self, part10_files: Sequence[bytes], *, study_instance_uid: str | None = None
    ) -> StowOutcome:
        """Store DICOM Part-10 objects (all in ``study_instance_uid`` when given)."""
        datasets = [_read_part10(data) for data in part10_files]
        try:
            answer = self._client.store_instances(datasets, study_instance_uid=study_instance_uid)
        except requests.HTTPError as exc:
            raise self._stow_http_error(exc) from exc
        except requests.RequestException as exc:
            raise _request_error("STOW-RS", self.endpoint, exc) from exc
        except ValueError as exc:  # unreadable answer: stored or not, a re-send is harmless
            raise DicomwebError(
                f"STOW-RS to {self.endpoint.url}: unreadable answer ({exc})", transient=True
            ) from exc
        return _stow_outcome(answer, self.endpoint)

    def store_files(
        self, paths: Iterable[Path], *, study_instance_uid: str | None = None
    ) -> StowOutcome:
        """Store DICOM Part-10 files; see :meth:`store_instances`."""
        contents = []
        for path in paths:
            try:
                contents.append(Path(path).read_bytes())
            except OSError as exc:
                raise DicomwebError(f"cannot read {path}: {exc}", transient=False) from exc
        return self.store_instances(contents, study_instance_uid=study_instance_uid)

    # --- QIDO-RS ---------------------------------------------------------------------------
    def search_studies(self, filters: dict[str, Any] | None = None) -> list[pydicom.Dataset]:
        """Studies matching ``filters`` (keyword → value, e.g. ``{"AccessionNumber": "A1"}``)."""
        return self._search(lambda: self._client.search_for_studies(search_filters=filters))

    def search_series(
        self, study_instance_uid: str, filters: dict[str, Any] | None = None
    ) -> list[pydicom.Dataset]:
        """Series of one study matching ``filters``."""
        return self._search(
            lambda: self._client.search_for_series(
                study_instance_uid=study_instance_uid, search_filters=filters
            )
        )

    def search_instances(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        filters: dict[str, Any] | None = None,
    ) -> list[pydicom.Dataset]:
        """Instances of one study (or series) matching ``filters``."""
        return self._search(
            lambda: self._client.search_for_instances(
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid,
                search_filters=filters,
            )
        )

    def _search(self, request: Callable[[], list[dict[str, Any]]]) -> list[pydicom.Dataset]:
        try:
            results = request()
        except requests.HTTPError as exc:
            raise _http_error("QIDO-RS", self.endpoint, exc) from exc
        except requests.RequestException as exc:
            raise _request_error("QIDO-RS", self.endpoint, exc) from exc
        return [pydicom.Dataset.from_json(result) for result in results]

    # --- WADO-RS ---------------------------------------------------------------------------
    def retrieve_study(self, study_instance_uid: str, store: Callable[[bytes], None]) -> int:
        """Pass every instance of the study to ``store`` as Part-10 bytes; return how many."""
        return self._retrieve(
            lambda: self._client.iter_study(study_instance_uid, media_types=ANY_TRANSFER_SYNTAX),
            store,
            f"study {study_instance_uid}",
        )

    def retrieve_series(
        self, study_instance_uid: str, series_instance_uid: str, store: Callable[[bytes], None]
    ) -> int:
        """Pass every instance of the series to ``store`` as Part-10 bytes; return how many."""
        return self._retrieve(
            lambda: self._client.iter_series(
                study_instance_uid, series_instance_uid, media_types=ANY_TRANSFER_SYNTAX
            ),
            store,
            f"series {series_instance_uid}",
        )

    def _retrieve(
        self,
        request: Callable[[], Iterator[pydicom.Dataset]],
        store: Callable[[bytes], None],
        what: str,
    ) -> int:
        count = 0
        try:
            for dataset in request():
                store(_to_part10(dataset))
                count += 1
        except requests.HTTPError as exc:
            raise _http_error("WADO-RS", self.endpoint, exc) from exc
        except requests.RequestException as exc:
            raise _request_error("WADO-RS", self.endpoint, exc) from exc
        except InvalidDicomError as exc:
            raise DicomwebError(
                f"WADO-RS from {self.endpoint.url}: a part is not DICOM ({exc})", transient=True
            ) from exc
        logger.info("WADO-RS retrieved %d instance(s) of %s", count, what)
        return count

    def _stow_http_error(self, exc: requests.HTTPError) -> DicomwebError:
        response = exc.response
        if response is not None and response.status_code == 409 and response.content:
            # 409 Conflict: none stored; the body says why, per instance.
            try:
                answer = pydicom.Dataset.from_json(response.json())
            except ValueError:
                answer = None
            if answer is not None and answer.get("FailedSOPSequence"):
                return _failed_sop_error(answer, self.endpoint)
        return _http_error("STOW-RS", self.endpoint, exc)


def _read_part10(data: bytes) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise DicomwebError(f"not a DICOM Part-10 object: {exc}", transient=False) from exc


def _to_part10(dataset: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _stow_outcome(answer: pydicom.Dataset, endpoint: DicomwebEndpoint) -> StowOutcome:
    if answer.get("FailedSOPSequence"):
        raise _failed_sop_error(answer, endpoint)
    stored: list[str] = []
    warnings: list[tuple[str, int]] = []
    for item in answer.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        stored.append(uid)
        if "WarningReason" in item:
            warnings.append((uid, int(item.WarningReason)))
            logger.warning(
                "STOW-RS to %s stored %s with warning 0x%04X",
                endpoint.url,
                uid,
                int(item.WarningReason),
            )
    retrieve_url = answer.get("RetrieveURL")
    return StowOutcome(
        stored_sop_instance_uids=tuple(stored),
        warnings=tuple(warnings),
        retrieve_url=str(retrieve_url) if retrieve_url else None,
    )


def _failed_sop_error(answer: pydicom.Dataset, endpoint: DicomwebEndpoint) -> DicomwebError:
    failures = []
    kinds = set()
    for item in answer.FailedSOPSequence:
        reason = int(item.get("FailureReason", 0x0110) or 0x0110)
        kinds.add(status_kind(reason))
        failures.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{reason:04X}")
    transient = kinds <= {"transient"}
    message = f"STOW-RS to {endpoint.url} refused instance(s): {'; '.join(failures)}"
    logger.warning(message)
    return DicomwebError(message, transient=transient)


def _http_error(
    transaction: str, endpoint: DicomwebEndpoint, exc: requests.HTTPError
) -> DicomwebError:
    status = exc.response.status_code if exc.response is not None else None
    transient = status is None or status >= 500 or status in TRANSIENT_HTTP_STATUSES
    reason = exc.response.reason if exc.response is not None else str(exc)
    message = f"{transaction} {endpoint.url}: HTTP {status} {reason}"
    logger.warning(message)
    return DicomwebError(message, transient=transient, http_status=status)


def _request_error(
    transaction: str, endpoint: DicomwebEndpoint, exc: requests.RequestException
) -> DicomwebError:
    transient = isinstance(
        exc, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError
    )
    message = f"{transaction} {endpoint.url}: {type(exc).__name__}: {exc}"
    logger.warning(message)
    return DicomwebError(message, transient=transient)

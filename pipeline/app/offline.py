"""One clear line, not a traceback, when a stage needs something it cannot reach.

Models from the hub, data files from the ROME site and WikiText through `datasets` each fail
offline with their own error that says what was needed, where it was looked for locally and what
provides it. A stage (`pipeline.app.stage`) runs inside `one_line_errors()`, which turns those,
and any other error caused by a missing network, into `error: <that line>` and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.error
from collections.abc import Iterator

from pipeline.core.models import ModelNotAvailableError
from pipeline.data.corpus import CorpusNotAvailableError
from pipeline.data.sources import DataNotFoundError

# Errors whose message already says what was needed, where it was looked for and what to do.
UNAVAILABLE = (ModelNotAvailableError, DataNotFoundError, CorpusNotAvailableError)
# Errors that mean "the network was needed and not there", by type or by name (the hub
# libraries' own classes, without importing them).
NETWORK_TYPES = (ConnectionError, urllib.error.URLError, socket.gaierror, TimeoutError)
NETWORK_NAMES = {
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectError",
    "ConnectTimeout",
    "NameResolutionError",
    "MaxRetryError",
}
NETWORK_TEXT = (
    "couldn't connect",
    "couldn't reach",
    "name or service not known",
    "temporary failure in name resolution",
    "network is unreachable",
    "failed to resolve",
)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def is_network_error(error: BaseException) -> bool:
    """Whether `error`, or what caused it, is the network being unavailable."""
    for link in _chain(error):
        if isinstance(link, NETWORK_TYPES) or type(link).__name__ in NETWORK_NAMES:
            return True
        if isinstance(link, OSError) and any(t in str(link).lower() for t in NETWORK_TEXT):
            return True
    return False


def unavailable_message(error: BaseException) -> str | None:
    """The one line for an error caused by something out of reach; None for any other error."""
    if isinstance(error, UNAVAILABLE):
        return " ".join(str(error).split())
    if is_network_error(error):
        return (
            f"this needed the network, which could not be reached ({type(error).__name__}: "
            f"{_first_line(error)}). Offline, point ROME_DATA=... at a data root that has the "
            "files (or run `make data` once with network), and pass hub models as "
            "model.path=/local/dir."
        )
    return None


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn an unreachable model, data file or corpus into `error: ...` and exit status 1."""
    try:
        yield
    except Exception as error:
        message = unavailable_message(error)
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from None

"""The log of a command-line ranking run: everything in a file, a quiet console.

A failing corpus makes Prefect log its traceback at every level it passes (the task, its retry,
the corpus task, the flow): hundreds of lines for one fault. During ``rbridge rank`` the full
log, tracebacks included, goes to a file; the console keeps Prefect's progress lines and
warnings, one line each, and leaves out the run loggers' errors, which the CLI reports once per
failed corpus. Configured by the CLI for the length of a run; the library configures nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rbridge_core.storage import is_url, join

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Prefect's loggers of flow and task runs: their errors are the failures the CLI reports.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def log_path(cache_dir: str, run_name: str) -> Path:
    """A fresh log file for a run named ``run_name``: ``<cache>/logs/`` when the cache is local,
    else the system's temporary folder (``rbridge-logs/``)."""
    folder = Path(tempfile.gettempdir(), "rbridge-logs") if is_url(cache_dir) else None
    folder = folder or Path(join(cache_dir.removeprefix("file://"), "logs"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return folder / f"{run_name}-{stamp}-{os.getpid()}.log"


class _ConsoleFilter(logging.Filter):
    """Prefect's progress (INFO) and anyone's warnings; not the run loggers' errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(RUN_LOGGERS) and record.levelno >= logging.ERROR:
            return False
        return record.levelno >= logging.WARNING or record.name.startswith("prefect")


class _OneLineFormatter(logging.Formatter):
    """``LEVEL logger: message``, first line only, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        # not Formatter.format: it caches the traceback text on the record, shared by handlers
        first = record.getMessage().splitlines()[0] if record.getMessage() else ""
        return f"{record.levelname} {record.name}: {first}"


@contextmanager
def run_logging(path: str | Path) -> Iterator[Path]:
    """Send every log record of the ``with`` block to file ``path`` (INFO and up, tracebacks
    included; rbridge's own INFO lines too) and a one-line summary of some to stderr.

    Console handlers already on the root logger (``logging.basicConfig``'s, Prefect's) are set
    aside for the block and put back afterwards, as are the levels changed here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    set_aside = [h for h in root.handlers if _is_console(h)]
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    to_file.setLevel(logging.INFO)
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(_OneLineFormatter())
    to_console.addFilter(_ConsoleFilter())
    library = logging.getLogger("rbridge_core")
    saved_level = library.level
    for handler in set_aside:
        root.removeHandler(handler)
    root.addHandler(to_file)
    root.addHandler(to_console)
    library.setLevel(logging.INFO)
    try:
        yield path
    finally:
        library.setLevel(saved_level)
        root.removeHandler(to_console)
        root.removeHandler(to_file)
        to_file.close()
        for handler in set_aside:
            root.addHandler(handler)


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to the terminal: a plain StreamHandler (basicConfig's) or Prefect's."""
    return type(handler) is logging.StreamHandler or type(handler).__name__ in (
        "PrefectConsoleHandler",
    )

"""What a training run prints: progress bars and one-line messages of llava_jax on the console;
everything else that logs (orbax, absl, grain, jax) goes to `<workdir>/train.log`.

    console   llava_jax INFO and up, other loggers ERROR and up (all INFO with --verbose);
              written through tqdm so that lines never break a progress bar
    train.log every logger at INFO and up, with time and source (train_process<i>.log on process i > 0)
"""

from __future__ import annotations

import logging
import pathlib
import re
import sys
import tempfile

from tqdm import tqdm

from llava_jax.paths import is_url

FILE_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose
        self.min_own = logging.INFO

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "llava_jax" or record.name.startswith("llava_jax."):
            return record.levelno >= self.min_own
        return record.levelno >= (self.min_own if self.verbose else logging.ERROR)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg if record.levelno < logging.WARNING else f"{record.levelname}: {msg}"


_console: logging.Handler | None = None


def setup(verbose: bool = False) -> None:
    """Replace absl's stderr handler with the filtered console handler (call once, at start)."""
    global _console
    from absl import logging as absl_logging

    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    if _console is not None:
        root.removeHandler(_console)
    _console = _TqdmHandler()
    _console.addFilter(_ConsoleFilter(verbose))
    _console.setFormatter(_ConsoleFormatter())
    root.addHandler(_console)
    root.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)  # to the log file; the console filter decides what shows


def add_log_file(workdir: str | pathlib.Path, process_index: int = 0) -> pathlib.Path:
    """Send every logger's INFO and up to the run's log file; on processes other than 0 the console
    keeps warnings and errors only."""
    original = workdir
    name = "train.log" if process_index == 0 else f"train_process{process_index}.log"
    if is_url(workdir):  # a bucket object cannot be appended to: log to a local file, named on the console
        workdir = pathlib.Path(tempfile.gettempdir()) / "llava_jax_logs" / re.sub(r"[^\w.-]+", "_", str(workdir))
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / name
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    if process_index != 0 and _console is not None:
        _console.setLevel(logging.WARNING)
    if is_url(original):
        logging.getLogger("llava_jax.train").info("library logs of this run: %s", path)
    return path

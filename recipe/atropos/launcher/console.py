"""Echo the services' log files to the console, each line prefixed with ``[service]``.

Services write straight to their log files, never through a pipe to the launcher: a slow console
or a launcher that dies can then never block or kill a service. The echo follows the files instead.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TextIO

__all__ = ["LogEcho"]


class LogEcho:
    """A daemon thread that follows log files from where they were when added and prints new lines."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 0.2) -> None:
        self._stream = stream or sys.stdout
        self._interval_s = interval_s
        self._files: dict[str, tuple[Path, int, bytes]] = {}  # name -> (path, offset, partial line)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-echo", daemon=True)
        self._width = 0

    def follow(self, name: str, path: Path) -> None:
        """Start echoing ``path`` (its existing content included) unless it is already followed."""
        with self._lock:
            if name not in self._files:
                self._files[name] = (path, 0, b"")
                self._width = max(self._width, len(name))
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self) -> None:
        """Print what is left and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self._drain(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        with self._lock:
            for name, (path, offset, partial) in list(self._files.items()):
                try:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read()
                except FileNotFoundError:
                    continue
                if not data and not (final and partial):
                    continue
                text = partial + data
                lines = text.split(b"\n")
                partial = lines.pop()  # an unfinished line waits for its end, unless this is the last drain
                if final and partial:
                    lines.append(partial)
                    partial = b""
                for line in lines:
                    self._stream.write(f"[{name:<{self._width}}] {line.decode(errors='replace')}\n")
                self._stream.flush()
                self._files[name] = (path, offset + len(data), partial)

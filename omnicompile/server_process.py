"""`omnicompile serve` as a child process on a loopback port, and a streaming client of its completions API.

Used by ``benchmarks/serve_load.py`` and ``tests/test_serve.py``. Standard library only (the client needs
none of the server's packages). `Server` starts ``python -P -m omnicompile.cli serve ...`` in a session of
its own (``-P``: the repository root never shadows installed packages), waits for ``/health``, and stops
the whole session (the API server and the model's process it spawned): SIGTERM, then SIGKILL after a grace
period, so no process outlives it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Server:
    """``omnicompile serve MODEL`` with ``args`` (e.g. ``["--attn-implementation", "sdpa"]``), its output
    in ``log``; a context manager that starts it (waiting up to ``start_timeout`` seconds) and stops it."""

    def __init__(self, model: str, args: list[str], log: Path, start_timeout: float = 300.0) -> None:
        self.port = free_port()
        self.command = [
            sys.executable,
            "-P",
            "-m",
            "omnicompile.cli",
            "serve",
            model,
            "--port",
            str(self.port),
        ]
        self.command += ["--host", HOST, *args]
        self.log, self.start_timeout = log, start_timeout
        self.process: subprocess.Popen | None = None
        self._deadline = 0.0

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """`launch`, then `wait_ready`."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the server process (in a session of its own) and return at once."""
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._deadline = time.monotonic() + self.start_timeout

    def wait_ready(self) -> None:
        """Wait until ``/health`` answers (the model has loaded); stop it and raise with the log's tail if it
        exits or the start timeout passes first."""
        while time.monotonic() < self._deadline:
            code = self.process.poll()
            if code is not None:
                self.stop()  # the model's process may still be there
                raise RuntimeError(f"the server exited ({code}):\n{self.log_tail()}")
            if self._healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server did not answer within {self.start_timeout} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            connection = http.client.HTTPConnection(HOST, self.port, timeout=2)
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def stop(self, grace: float = 15.0) -> None:
        """Stop the server's whole session: SIGTERM, SIGKILL whatever is left after ``grace`` seconds."""
        if self.process is None:
            return
        group = self.process.pid  # the session leader: its process group id
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.process.poll() is None or _group_alive(group):  # poll reaps the leader once it exits
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    """Whether a process of process group ``group`` is still there (callers reap the leader first)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Completion:
    """One streamed completion: its text, token counts (the server's) and times in seconds from sending."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    error: str | None = None


def complete(port: int, prompt: str, max_tokens: int, timeout: float) -> Completion:
    """Greedy ``/v1/completions`` of ``prompt`` (``max_tokens`` new tokens at most), streamed; the time to
    first token is the time to the first chunk of the answer. Errors are returned in ``error``, not raised."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    result, start = Completion(), time.perf_counter()
    pieces: list[str] = []
    try:
        connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:500].decode(errors='replace')}"
            return result
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = str(chunk["error"])
                return result
            for choice in chunk.get("choices", []):
                if result.ttft is None:  # the first token's (only a finish reason if it ended the answer)
                    result.ttft = time.perf_counter() - start
                pieces.append(choice.get("text") or "")
            if chunk.get("usage"):
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                result.completion_tokens = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - start
    except (OSError, http.client.HTTPException, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    result.text = "".join(pieces)
    return result

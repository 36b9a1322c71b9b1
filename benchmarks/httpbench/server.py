"""Start uvicorn on a free loopback port for one config, load it with wrk, stop it by PID.

Also a throwaway redis-server for exact command counts: started on a free loopback port with no
persistence, stopped by PID.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_prefix(cpu: int | None) -> list[str]:
    """``taskset -c CPU`` when pinning was asked for and taskset exists, else nothing."""
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


def uvicorn_options() -> list[str]:
    """uvloop and httptools when installed (as in production), else uvicorn's pure-Python fallbacks."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return ["--loop", loop, "--http", parser, "--no-access-log", "--log-level", "warning", "--lifespan", "auto"]


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process, in KiB (Linux /proc), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_until_serving(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with code {proc.returncode} before serving")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
        finally:
            connection.close()
    raise RuntimeError(f"uvicorn did not answer on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


@dataclass
class Server:
    """A running uvicorn: its PID, port and log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def uvicorn_server(env: Mapping[str, str], cpu: int | None, timeout: float = 30.0) -> Iterator[Server]:
    """Run ``httpbench.apps:server_app`` under uvicorn (1 worker) until the block ends."""
    port = free_port()
    command = [
        *pin_prefix(cpu),
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "httpbench.apps:server_app",
        "--app-dir",
        str(BENCH_DIR),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *uvicorn_options(),
    ]
    fd, log_name = tempfile.mkstemp(prefix="bench-http-uvicorn-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "wb") as log_file:
        # A session of its own: a Ctrl-C on the harness reaches the harness only, which then stops this PID.
        proc = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(proc, port, log)
    try:
        try:
            _wait_until_serving(port, proc, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{server.log_tail()}") from None
        yield server
    finally:
        stop(proc)
        log.unlink(missing_ok=True)


# -- wrk ------------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_DURATION = r"([\d.]+)(us|ms|s|m)\b"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """The figures of ``wrk --latency`` output: requests, req/s, latency percentiles in ms, errors."""
    result: dict[str, Any] = {}
    if match := re.search(r"(\d+) requests in " + _DURATION, output):
        result["requests"] = int(match.group(1))
        result["seconds"] = _ms(match.group(2), match.group(3)) / 1e3
    if match := re.search(r"Requests/sec:\s+([\d.]+)", output):
        result["rps"] = float(match.group(1))
    for percentile in ("50", "75", "90", "99"):
        if match := re.search(rf"^\s+{percentile}%\s+" + _DURATION, output, re.MULTILINE):
            result[f"p{percentile}_ms"] = round(_ms(match.group(1), match.group(2)), 4)
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["socket_errors"] = sum(int(group) for group in match.groups()) if match else 0
    return result


def run_wrk(url: str, seconds: float, connections: int, cpu: int | None, latency: bool = True) -> dict[str, Any]:
    """``wrk -t1 -c<connections> -d<seconds>s [--latency] URL``; bounded by wrk's own -d and a timeout here."""
    duration = max(1, round(seconds))
    command = [*pin_prefix(cpu), "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s"]
    if latency:
        command.append("--latency")
    command.append(url)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    result = parse_wrk(done.stdout)
    if "rps" not in result:
        raise RuntimeError(f"could not read wrk's output:\n{done.stdout}")
    return result


def wrk_version() -> str:
    if shutil.which("wrk") is None:
        return "missing"
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip() if (done.stdout or done.stderr) else "unknown"


# -- a private redis-server, for exact per-request command counts ------------------------------------------


@contextlib.contextmanager
def private_redis(extra_args: Sequence[str] = ()) -> Iterator[str]:
    """A redis-server of our own on a free loopback port, no persistence; yields its URL, then stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    directory = tempfile.mkdtemp(prefix="bench-http-redis-")
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    command += ["--dir", directory, *extra_args]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer within 10 s") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/1"
    finally:
        stop(proc)
        shutil.rmtree(directory, ignore_errors=True)

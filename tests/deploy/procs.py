"""Processes the deploy tests start: `vkmmu` commands and a real nginx, all on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vkmmu_command() -> list[str]:
    script = Path(sys.executable).parent / "vkmmu"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def run_vkmmu(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vkmmu_command(), *args],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready in time: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Replica:
    """One `vkmmu serve` process, as a compose replica runs it (settings from VKMMU_*)."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.env = env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [*vkmmu_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=os.environ | self.env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_http(f"{self.base}/readyz", self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None,
    )


def render_nginx_conf(listen: int, upstreams: list[int], tmp: Path) -> str:
    """The shipped config with loopback addresses: only the lines marked `render:` change,
    and the file paths under /tmp move into `tmp`."""
    text = NGINX_CONF.read_text()
    replicas = iter(upstreams)

    def line(m: re.Match[str]) -> str:
        indent, body, what = m.group(1), m.group(2), m.group(3)
        if what == "listen":
            return f"{indent}listen 127.0.0.1:{listen};"
        port = next(replicas)
        return indent + re.sub(r"server \S+", f"server 127.0.0.1:{port}", body)

    text = re.sub(r"(?m)^(\s*)(.*?;)\s*# render: (listen|replica \d)$", line, text)
    assert next(replicas, None) is None, "the config has fewer replicas than the test"
    return text.replace("/tmp/", f"{tmp}/")


def nginx_test(binary: str, conf: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "-t", "-p", str(prefix), "-e", "stderr", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_nginx(binary: str, conf: Path, prefix: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [binary, "-p", str(prefix), "-e", "stderr", "-c", str(conf), "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

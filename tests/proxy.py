"""A real HTTP CONNECT proxy for the tests: Debian's tinyproxy on loopback, with Basic authentication.

scripts/test.sh installs it (packaging/test-packages.txt)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port


@dataclass
class Proxy:
    url: str  # http://127.0.0.1:PORT (no credentials)
    username: str
    password: str
    log: Path
    process: subprocess.Popen

    def connects(self, target: str = "") -> int:
        """CONNECT requests the proxy served so far (to ``target`` host:port if given)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return sum(1 for line in text.splitlines() if "): CONNECT " in line and target in line)

    def refusals(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("407") + text.count("Failed auth")


def start_tinyproxy(directory: Path, username: str = "gw-proxy", password: str = "proxy-pass-1") -> Proxy:
    binary = shutil.which("tinyproxy") or "/usr/sbin/tinyproxy"
    if not Path(binary).exists():
        raise RuntimeError("tinyproxy is not installed; run `bash scripts/test.sh`, which installs the Debian "
                           "packages in packaging/test-packages.txt")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = directory / "tinyproxy.log"
    conf = directory / "tinyproxy.conf"
    conf.write_text("\n".join([
        f"Port {port}", "Listen 127.0.0.1", "Timeout 600", "MaxClients 100", "Allow 127.0.0.1",
        f"BasicAuth {username} {password}", "LogLevel Info", f'LogFile "{log}"',
        f'PidFile "{directory / "tinyproxy.pid"}"', ""]))
    proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"tinyproxy did not start (exit {proc.poll()}); see {log}") from None
            time.sleep(0.05)
    return Proxy(f"http://127.0.0.1:{port}", username, password, log, proc)

"""The container image built, started and probed with podman, as CI does it (skip with GATEWAY_TEST_IMAGE=0).

    .venv/bin/pytest -q tests/test_image.py

needs podman and runc and, the first time, mmdebstrap to build the stand-in for `python:3.11-slim-bookworm` that no
registry here serves (../shared/docs/packaging.md; ~1 min, then reused); scripts/test.sh installs all three
(packaging/test-packages.txt). The build itself needs PyPI (pip runs inside it). One CONTAINERS_CONF, written
here, selects runc and mounts the host's CA bundle into builds and containers; nothing under /etc is changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.security.vault import new_key_text
from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD
from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
BASE = "docker.io/library/python:3.11-slim-bookworm"
IMAGE = "localhost/exchange-room-gateway:test"

pytestmark = [pytest.mark.skipif(os.environ.get("GATEWAY_TEST_IMAGE") == "0",
                                 reason="GATEWAY_TEST_IMAGE=0: the container image is not built"),
              # building the image (its setup) takes a minute on a quiet machine and more on a busy one; every
              # step below has its own bound
              pytest.mark.timeout(900)]

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
volumes = ["/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment podman runs in, with the stand-in base image and the gateway's image built."""
    for tool in ("podman", "runc"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed: apt-get install podman runc")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    if subprocess.run(["podman", "image", "exists", BASE], env=env).returncode != 0:
        _build_base(env, conf.parent)
    build = subprocess.run(["podman", "build", "-q", "--format", "docker", "--pull=never", "-t", IMAGE,
                            "--build-arg", "REVISION=test", str(ROOT)], env=env, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    yield env


def _build_base(env: dict[str, str], work: Path) -> None:
    if not shutil.which("mmdebstrap"):
        pytest.skip(f"{BASE} is not present and mmdebstrap is not installed to build its stand-in: "
                    "apt-get install --no-install-recommends mmdebstrap")
    tar = work / "base.tar"
    hooks = ['rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED',
             'ln -sf /usr/bin/python3 "$1"/usr/local/bin/python; ln -sf /usr/bin/python3 "$1"/usr/local/bin/python3; '
             'ln -sf /usr/bin/pip3 "$1"/usr/local/bin/pip',
             'rm -rf "$1"/var/lib/apt/lists/*; : > "$1"/etc/resolv.conf; : > "$1"/etc/hostname']
    subprocess.run(["mmdebstrap", "--variant=minbase", "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                    "--include=python3,python3-pip,python3-venv,ca-certificates",
                    *[f"--customize-hook={h}" for h in hooks], "bookworm", str(tar), "http://deb.debian.org/debian"],
                   env=env, check=True, capture_output=True, timeout=900)
    subprocess.run(["podman", "import", "-q", "--change",
                    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', str(tar), BASE],
                   env=env, check=True, capture_output=True, timeout=300)
    tar.unlink()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_the_image_runs_doctor_and_the_gateway_as_non_root_on_a_read_only_root(podman, ews, tmp_path):
    env = podman
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""\
exchange:
  ews_url: {ews.url}
  allow_insecure_http: true
  username: 'CONTOSO\\{SERVICE_ACCOUNT}'
rooms:
  mailboxes: [room1@contoso.com, room2@contoso.com]
sync:
  mode: poll
  poll_interval_seconds: 5
""")
    key = tmp_path / "vault.key"
    key.write_text(new_key_text() + "\n")
    key.chmod(0o600)
    os.chown(key, 10001, 10001)  # the image's user; the tests run as root here
    volume = f"gateway-test-{uuid.uuid4().hex[:8]}"
    name = f"gateway-test-{uuid.uuid4().hex[:8]}"
    common = ["--read-only", "--tmpfs", "/tmp", "--network", "host", "-v", f"{volume}:/var/lib/gateway",
              "-v", f"{config}:/etc/gateway/gateway.yaml:ro", "-v", f"{key}:/run/secrets/vault-key:ro",
              "-e", f"GATEWAY_API__PORT={port}"]
    try:
        stored = subprocess.run(["podman", "run", "--rm", "-i", "--no-healthcheck", *common, IMAGE,
                                 "credentials", "set", "exchange", "--stdin"], input=SERVICE_PASSWORD, env=env,
                                capture_output=True, text=True, timeout=120)
        assert stored.returncode == 0, stored.stderr
        started = subprocess.run(["podman", "run", "-d", "--name", name, *common, IMAGE], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        wait_for(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, timeout=120, what="/readyz 200")
        assert _status(f"http://127.0.0.1:{port}/metrics") == 401, "off loopback /metrics needs an API key"

        doctor = subprocess.run(["podman", "exec", name, "gateway", "doctor"], env=env, capture_output=True,
                                text=True, timeout=300)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert subprocess.run(["podman", "exec", name, "id", "-u"], env=env, capture_output=True, text=True,
                              timeout=60).stdout.strip() == "10001"
        touch = subprocess.run(["podman", "exec", name, "sh", "-c", "touch /opt/gateway/x"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr
        inspect = json.loads(subprocess.run(["podman", "inspect", name], env=env, capture_output=True, text=True,
                                            timeout=60).stdout)[0]
        assert inspect["HostConfig"]["ReadonlyRootfs"] is True and inspect["Config"]["User"] == "10001:10001"
        health = subprocess.run(["podman", "healthcheck", "run", name], env=env, capture_output=True, text=True,
                                timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr

        stopped = subprocess.run(["podman", "stop", "-t", "60", name], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        state = json.loads(subprocess.run(["podman", "inspect", name], env=env, capture_output=True, text=True,
                                          timeout=60).stdout)[0]["State"]
        assert state["ExitCode"] == 0, f"SIGTERM ends the gateway cleanly, not with {state['ExitCode']}"
        logs = subprocess.run(["podman", "logs", name], env=env, capture_output=True, text=True, timeout=60)
        lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if ln.strip()]
        assert lines and all(json.loads(ln)["event"] for ln in lines), "JSON log lines only"
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True, timeout=120)
        subprocess.run(["podman", "volume", "rm", "-f", volume], env=env, capture_output=True, timeout=120)

"""The container image and the Helm chart, checked the way a customer's security and Kubernetes teams read them.

The Dockerfile is linted with hadolint; the chart is rendered with helm-render (the offline `helm template` stand-in
in ../shared/tools, built once per machine into ~/.cache), validated against the Kubernetes schemas with unknown fields
refused (kubernetes-validate --strict), its values schema is shown to refuse bad values, and the rendered objects
are read for what matters: non-root, read-only root filesystem, no capability, no service-account token, probes,
and a configuration the gateway itself accepts. hadolint and kubernetes-validate come with the test extra; a test
skips, saying why, only when a tool cannot be had on this machine.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_config
from gateway.security.vault import parse_key
from gateway.sharding import Shard

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
DOCKERFILE = ROOT / "Dockerfile"
HELM_RENDER_SRC = ROOT.parent / "shared" / "tools" / "helm-render"  # CI sees shared/ next to the checkout
# Outside the checkout: a fresh clone on the same machine (CI's) finds what an earlier run built.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exchange-room-gateway"
KUBE = "1.29.0"

pytestmark = pytest.mark.xdist_group("helm-render")  # one worker builds helm-render the first time, not all of them

# Every optional part of the chart switched on (and an existing Secret, a proxy, a CA bundle, extra environment).
ALL_ON: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "config": {
        "exchange": {"ews_url": "https://mail.contoso.com/EWS/Exchange.asmx", "username": "CONTOSO\\svc-rooms",
                     "password_ref": "env:EWS_PASSWORD"},
        "rooms": {"mailboxes": ["room1@contoso.com", "room2@contoso.com"]},
        "relay": {"enabled": True, "hub_url": "wss://hub.example.com/v1/tunnel"},
    },
    "vaultKey": {"existingSecret": "corp-vault-key", "existingSecretKey": "key"},
    "secretEnv": {"EWS_PASSWORD": "not-a-real-password"},
    "extraEnv": [{"name": "TZ", "value": "Europe/Berlin"}],
    "extraEnvFrom": [{"configMapRef": {"name": "more-env"}}],
    "proxy": {"url": "http://proxy.corp.example:3128", "username": "svc-proxy",
              "passwordSecret": {"name": "proxy-secret", "key": "password"}},
    "caBundle": {"pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
    "networkPolicy": {"enabled": True, "exchange": {"cidrs": ["10.1.0.0/16"]}, "hub": {"cidrs": ["203.0.113.0/24"]},
                      "proxy": {"cidrs": ["10.2.3.4/32"]}, "apiFromNamespaces": ["displays", "monitoring"]},
    "serviceMonitor": {"enabled": True, "apiKeySecret": {"name": "gateway-metrics-key"}},
    "prometheusRule": {"enabled": True},
}
# Several replicas sharing the rooms, each enrolling with its own token at its first start.
REPLICATED: dict[str, Any] = {
    **ALL_ON, "replicaCount": 3,
    "enrollment": {"hubUrl": "https://hub.example.com", "tokens": ["tok-0", "tok-1", "tok-2"]}}


# -- the tools ---------------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    """A console script of the test extra: next to this Python first (the venv), then on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed: `pip install -e '.[test]'` (scripts/test.sh) installs it")
    return found


@pytest.fixture(scope="module")
def helm_render() -> str:
    """helm-render, built by its build.sh (Debian Go packages; ~35 s the first time) once per machine and version of
    its sources, by one worker while the others wait (a file lock), with Go's build cache kept for the next one."""
    if not (HELM_RENDER_SRC / "build.sh").exists():
        pytest.skip(f"helm-render's sources are not at {HELM_RENDER_SRC}; build them there")
    version = hashlib.sha256(b"".join((HELM_RENDER_SRC / name).read_bytes() for name in ("build.sh", "main.go")))
    binary = CACHE / f"helm-render-{version.hexdigest()[:16]}"
    if os.access(binary, os.X_OK):
        return str(binary)
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "helm-render.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(binary, os.X_OK):  # built by another worker meanwhile
            return str(binary)
        partial = binary.with_name(f"{binary.name}.{os.getpid()}")
        done = subprocess.run(["sh", str(HELM_RENDER_SRC / "build.sh"), str(partial)], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "GOCACHE": str(CACHE / "go-build")})
        if done.returncode != 0:
            pytest.skip(f"cannot build helm-render (it needs apt-get and Debian's Go packages): {done.stderr[-500:]}")
        partial.replace(binary)  # atomic: a concurrent run sees no half-written binary
    return str(binary)


def render(helm_render: str, values: dict[str, Any] | None = None, *args: str) -> subprocess.CompletedProcess[str]:
    """`helm template rel helm/ -f VALUES ARGS` with helm-render; values go in as YAML on stdin."""
    cmd = [helm_render, "rel", str(CHART), "--kube-version", f"v{KUBE}", "-n", "rooms", *args]
    if values is not None:
        cmd += ["-f", "-"]
    return subprocess.run(cmd, input=yaml.safe_dump(values) if values is not None else None, capture_output=True,
                          text=True, timeout=60)


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


@pytest.fixture(scope="module", params=["defaults", "all-on", "replicated"])
def rendered(request: pytest.FixtureRequest, helm_render: str, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    done = render(helm_render, {"all-on": ALL_ON, "replicated": REPLICATED}.get(request.param))
    assert done.returncode == 0, done.stderr
    out = tmp_path_factory.mktemp("chart") / f"{request.param}.yaml"
    out.write_text(done.stdout, encoding="utf-8")
    yield request.param, out


# -- the image ---------------------------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in _final_stage():
        if op == "ENV":
            env.update(dict(part.split("=", 1) for part in shlex.split(rest)))
    return env


def test_the_dockerfile_is_hadolint_clean():
    done = subprocess.run([_tool("hadolint"), "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_multi_stage_on_the_python_base_and_runs_the_gateway_as_a_fixed_non_root_user():
    steps = _instructions()
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in steps
    froms = [rest for op, rest in steps if op == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    final = _final_stage()
    assert [rest for op, rest in final if op == "FROM"] == ["${BASE_IMAGE}"], "the final stage starts afresh"
    # Only the built venv comes over from the build stage: no compiler, no pip cache, no sources.
    copies = [rest for op, rest in final if op == "COPY"]
    assert all(c == "--from=build /opt/gateway /opt/gateway" or not c.startswith("--from") for c in copies), copies
    assert not any(op == "RUN" and re.search(r"apt-get|pip install|gcc|build-essential", rest) for op, rest in final)
    users = [rest for op, rest in final if op == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), f"a numeric non-root uid:gid, not {users}"
    assert ("ENTRYPOINT", '["gateway"]') in final and ("CMD", '["run"]') in final
    assert ("VOLUME", '["/var/lib/gateway"]') in final
    health = [rest for op, rest in final if op == "HEALTHCHECK"]
    assert health and "/healthz" in health[0] and "curl" not in health[0] and '"python"' in health[0]
    labels = " ".join(rest for op, rest in final if op == "LABEL")
    for label in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_the_image_defaults_make_a_configuration_the_gateway_accepts_with_state_on_the_volume():
    env = _image_env()
    assert env["GATEWAY_LOG_FORMAT"] == "json"
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/gateway.yaml"
    copies = [rest for op, rest in _final_stage() if op == "COPY"]
    assert "config/container.yaml /etc/gateway/gateway.yaml" in copies
    site = {"GATEWAY_EXCHANGE__EWS_URL": "https://mail.contoso.com/EWS/Exchange.asmx",
            "GATEWAY_EXCHANGE__USERNAME": "CONTOSO\\svc", "GATEWAY_ROOMS__MAILBOXES": "room1@contoso.com"}
    config = load_config(ROOT / "config" / "container.yaml", env={**env, **site})
    assert config.api.host == "0.0.0.0"  # reachable through a published port; API keys then guard /metrics
    assert config.store.path.parent == config.vault.path.parent == Path("/var/lib/gateway")
    assert config.vault.key_file.parent == Path("/run/secrets"), "the key is a secret, apart from the vault"


def test_the_build_context_holds_only_what_the_build_copies():
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", "deny everything, then allow: no .venv, secrets, data or .git in the context"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for op, rest in _instructions():
        if op == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src} is not in .dockerignore's allow-list"


# -- the chart ---------------------------------------------------------------------------------------------------
def test_the_values_schema_carries_the_published_configuration_schema():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "helm-values-schema.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_rendered_chart_is_valid_kubernetes_with_unknown_fields_refused(rendered):
    _, path = rendered
    done = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBE, str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_validation_would_catch_an_unknown_field(rendered, tmp_path):
    """The check above can fail: the same output with one misplaced field is refused."""
    _, path = rendered
    docs = objects(path.read_text())
    one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    done = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBE, str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "readOnlyRootFilesystem" in done.stdout + done.stderr


@pytest.mark.parametrize(("flag", "named"), [
    ("replicaCount=0", "replicaCount"),
    ("replicaCount=1001", "replicaCount"),
    ("enrollment.hubUrl=http://hub.example.com", "enrollment.hubUrl"),  # TLS only
    ("config.sync.mode=push", "config.sync.mode"),
    ("config.api.port=99999", "config.api.port"),
    ("config.exchange.password=hunter2", "config.exchange"),
    ("config.exchnage.ews_url=https://x", "config"),
    ("securityContext.readOnlyRootFilesystem=false", "securityContext.readOnlyRootFilesystem"),
    ("securityContext.allowPrivilegeEscalation=true", "securityContext.allowPrivilegeEscalation"),
    ("securityContext.runAsNonRoot=false", "securityContext.runAsNonRoot"),
    ("podSecurityContext.runAsNonRoot=false", "podSecurityContext.runAsNonRoot"),
    ("vaultKey.value=too-short", "vaultKey.value"),
    ("proxy.url=https://user:pw@proxy:3128", "proxy.url"),
    ("service.type=ExternalName", "service.type"),
    ("replicas=2", "replicas"),
])
def test_the_values_schema_refuses_bad_values(helm_render, flag, named):
    done = render(helm_render, None, "--set", flag)
    assert done.returncode != 0, f"--set {flag} was accepted"
    assert "values don't meet the specifications of the schema" in done.stderr and named in done.stderr, done.stderr


def test_every_pod_runs_without_privilege_and_without_a_service_account_token(rendered):
    _, path = rendered
    docs = objects(path.read_text())
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    for sa in (d for d in docs if d["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc.get("runAsUser", psc["runAsUser"]) != 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", c["name"]
        if c in pod["containers"]:  # an init container runs to its end: no probes
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        # Writable places: the state volume and a tmpfs, nothing else.
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["medium"] == "Memory"
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        assert mounts["/var/lib/gateway"]["name"] in claims
        writable = {p for p, m in mounts.items() if not m.get("readOnly")}
        assert writable == {"/tmp", "/var/lib/gateway"}, writable


def test_the_statefulset_has_its_headless_service_a_disruption_budget_and_spreads_over_nodes(rendered):
    _, path = rendered
    docs = objects(path.read_text())
    sts = one(docs, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    headless = one(docs, "Service", "-headless")
    assert headless["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == headless["metadata"]["name"]
    api = next(d for d in docs if d["kind"] == "Service" and d is not headless)
    for svc in (api, headless):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["ports"][0]["targetPort"] == "api"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def _pod_env(sts: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet would make it (secret references resolved from ``secrets``)."""
    env: dict[str, str] = {}
    for var in sts["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in (ref := var.get("valueFrom", {})):
            env[var["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
    return env


def test_the_rendered_configuration_and_environment_are_accepted_by_the_gateway(helm_render, tmp_path):
    done = render(helm_render, ALL_ON)
    assert done.returncode == 0, done.stderr
    docs = objects(done.stdout)
    gateway_yaml = one(docs, "ConfigMap", "gateway")["data"]["gateway.yaml"]
    assert yaml.safe_load(gateway_yaml) == ALL_ON["config"]
    (tmp_path / "gateway.yaml").write_text(gateway_yaml)
    env_secret = one(docs, "Secret", "-env")
    decoded = {k: base64.b64decode(v).decode() for k, v in env_secret["data"].items()}
    existing_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = _pod_env(one(docs, "StatefulSet"), {"corp-vault-key": {"key": existing_key},
                                              "proxy-secret": {"password": "p"}})
    env.update(decoded)  # envFrom the chart's Secret
    config = load_config(tmp_path / "gateway.yaml", env=env)
    assert config.api.host == "0.0.0.0" and config.store.path == Path("/var/lib/gateway/gateway.sqlite")
    assert config.vault.key_env == "GATEWAY_VAULT_KEY"
    assert config.relay.proxy_url == "http://proxy.corp.example:3128"
    assert str(config.relay.proxy_password_ref) == "env:GATEWAY_PROXY_PASSWORD"
    assert str(config.exchange.password_ref) == "env:EWS_PASSWORD" and env["EWS_PASSWORD"] == "not-a-real-password"


def test_the_chart_makes_a_valid_vault_key_that_survives_upgrades_unless_one_is_given(helm_render):
    docs = objects(render(helm_render).stdout)
    secret = one(docs, "Secret", "-vault-key")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["vault-key"]).decode()
    assert parse_key(key, "the chart's Secret")  # 32 random bytes, in the form the gateway reads
    assert key != base64.b64decode(one(objects(render(helm_render).stdout), "Secret", "-vault-key")["data"]
                                   ["vault-key"]).decode(), "a fresh random key per new install"
    given = base64.urlsafe_b64encode(os.urandom(32)).decode()
    docs = objects(render(helm_render, {"vaultKey": {"value": given}}).stdout)
    assert base64.b64decode(one(docs, "Secret", "-vault-key")["data"]["vault-key"]).decode() == given
    docs = objects(render(helm_render, ALL_ON).stdout)
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-vault-key")]


def test_the_network_policy_lets_out_only_dns_exchange_the_hub_and_the_proxy(helm_render):
    docs = objects(render(helm_render, ALL_ON).stdout)
    policy = one(docs, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"port": "api", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["displays", "monitoring"]
    egress = policy["egress"]
    dns = egress[0]
    assert {p["port"] for p in dns["ports"]} == {53} and "ipBlock" not in dns["to"][0]
    blocks = [(sorted(t["ipBlock"]["cidr"] for t in rule["to"]), sorted(p["port"] for p in rule["ports"]))
              for rule in egress[1:]]
    assert blocks == [(["10.1.0.0/16"], [443]), (["203.0.113.0/24"], [443]), (["10.2.3.4/32"], [3128])]
    assert not any("ipBlock" in t and t["ipBlock"]["cidr"] == "0.0.0.0/0" for r in egress for t in r["to"])
    # Off by default.
    assert not [d for d in objects(render(helm_render).stdout) if d["kind"] == "NetworkPolicy"]


def _exported_metrics() -> set[str]:
    """The metric names the gateway exports (counters with their _total), read from where they are declared."""
    names: set[str] = set()
    for src in (ROOT / "gateway" / "observability" / "metrics.py", ROOT / "gateway" / "sources" / "ews" / "metrics.py"):
        for kind, name in re.findall(r"(Counter|Gauge|Histogram|GaugeMetricFamily)\(\s*\"(gateway_\w+)\"",
                                     src.read_text()):
            names.add(name + "_total" if kind == "Counter" else name)
    return names


def test_the_alerts_and_the_scrape_use_metrics_the_gateway_exports(helm_render):
    docs = objects(render(helm_render, ALL_ON).stdout)
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    assert alerts == {"GatewayRoomNotSynced", "GatewaySourceAuthRequired", "GatewayOutboxBacklogGrowing",
                      "GatewayTunnelDown"}
    exported = _exported_metrics()
    assert "gateway_room_last_sync_age_seconds" in exported  # the reading above finds them
    for rule in rules:
        used = set(re.findall(r"\bgateway_\w+", rule["expr"]))
        assert used and used <= exported, f"{rule['alert']}: {used - exported} is not a metric the gateway exports"
        assert 'pod=~"rel-exchange-room-gateway-[0-9]+"' in rule["expr"]
    monitor = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert monitor["path"] == "/metrics" and monitor["port"] == "api"
    assert monitor["authorization"]["credentials"] == {"name": "gateway-metrics-key", "key": "api-key"}
    # No relay, no tunnel alert.
    no_relay = {**ALL_ON, "config": {k: v for k, v in ALL_ON["config"].items() if k != "relay"}}
    rules = one(objects(render(helm_render, no_relay).stdout), "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert "GatewayTunnelDown" not in {r["alert"] for r in rules}


def test_a_service_monitor_without_the_metrics_key_is_refused_with_the_remedy(helm_render):
    done = render(helm_render, None, "--set", "serviceMonitor.enabled=true")
    assert done.returncode != 0
    assert "serviceMonitor.apiKeySecret.name" in done.stderr and "--scope metrics" in done.stderr


def test_the_notes_name_the_next_steps(helm_render, tmp_path):
    """helm-render renders NOTES.txt only to surface its errors: a copy of the chart shows its text in a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "exchange-room-gateway/templates/NOTES.txt" . | toJson }}}\n')

    def notes(values: dict[str, Any] | None) -> str:
        cmd = [helm_render, "rel", str(chart), "-n", "rooms"] + (["-f", "-"] if values else [])
        done = subprocess.run(cmd, input=yaml.safe_dump(values) if values else None, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return str(one(objects(done.stdout), "ConfigMap", "notes")["data"]["notes"])

    bare = notes(None)
    for step in ("gateway credentials set exchange", "gateway doctor", "gateway enroll", "gateway api-keys create",
                 "kubectl -n rooms exec rel-exchange-room-gateway-0"):
        assert step in bare
    assert "names no Exchange" in bare and "Back up the vault key" in bare
    configured = notes(ALL_ON)
    assert "names no Exchange" not in configured and "Back up the vault key" not in configured
    assert "gateway-metrics-key" in configured and "--scope metrics" in configured


def test_the_compose_trial_starts_the_gateway_against_the_simulator_with_a_configuration_it_accepts():
    from gateway.simulator.seed import SERVICE_ACCOUNT, SERVICE_PASSWORD

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    sim, gw = compose["services"]["simulator"], compose["services"]["gateway"]
    for service in (sim, gw):
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"] and service["tmpfs"] == ["/tmp"]
    assert sim["command"][0] == "simulator" and "0.0.0.0" in sim["command"]
    port = sim["command"][sim["command"].index("--port") + 1]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in gw["volumes"]}
    assert mounts == {"gateway-data": "/var/lib/gateway", "./compose/gateway.trial.yaml": "/etc/gateway/gateway.yaml"}
    trial = ROOT / "compose" / "gateway.trial.yaml"
    config = load_config(trial, env={**_image_env(), **gw["environment"]})
    assert config.exchange is not None and config.exchange.ews_url == f"http://simulator:{port}/EWS/Exchange.asmx"
    assert config.exchange.username == f"CONTOSO\\{SERVICE_ACCOUNT}"
    assert gw["environment"]["EWS_PASSWORD"] == SERVICE_PASSWORD
    assert gw["ports"] == ["127.0.0.1:8088:8088"] and gw["stop_grace_period"] == "60s"


def test_several_replicas_share_the_rooms_and_each_enrols_with_its_own_token(helm_render, tmp_path):
    done = render(helm_render, REPLICATED)
    assert done.returncode == 0, done.stderr
    docs = objects(done.stdout)
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    # Each pod's configuration: its ordinal from its name, the count, and its peers' API over the headless Service.
    (tmp_path / "gateway.yaml").write_text(one(docs, "ConfigMap", "gateway")["data"]["gateway.yaml"])
    env = _pod_env(sts, {"corp-vault-key": {"key": base64.urlsafe_b64encode(os.urandom(32)).decode()},
                         "proxy-secret": {"password": "p"}})
    env.update({"EWS_PASSWORD": "x", "POD_NAME": "rel-exchange-room-gateway-2"})  # the downward API's value
    config = load_config(tmp_path / "gateway.yaml", env=env)
    assert config.replicas.shard(env) == Shard(2, 3)
    headless = one(docs, "Service", "-headless")["metadata"]["name"]
    assert config.replicas.peer_url == f"http://rel-exchange-room-gateway-{{ordinal}}.{headless}.rooms.svc:8088"
    # One enrolment token per replica, each replica reading its own (token-N for gateway-N), once.
    tokens = one(docs, "Secret", "-enrollment")["data"]
    assert {k: base64.b64decode(v).decode() for k, v in tokens.items()} == {
        "token-0": "tok-0", "token-1": "tok-1", "token-2": "tok-2"}
    pod = sts["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    script = init["args"][0]
    assert 'token="/etc/gateway/enroll/token-${POD_NAME##*-}"' in script
    assert 'gateway enroll --hub "$HUB_URL" --token - --name "$POD_NAME" < "$token"' in script
    assert '[ "$status" -eq 1 ] && exit 0' in script  # already enrolled: a restart goes on
    init_env = {e["name"]: e.get("value") for e in init["env"]}
    assert init_env["HUB_URL"] == "https://hub.example.com"
    assert init_env["GATEWAY_VAULT__PATH"] == env["GATEWAY_VAULT__PATH"]  # the same vault the gateway reads
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["enroll"]["secret"]["secretName"] == "rel-exchange-room-gateway-enrollment"
    # The replicas may reach each other's API (forwarded commands), nothing else is opened.
    policy = one(docs, "NetworkPolicy")["spec"]
    peers = [r for r in policy["ingress"] if "podSelector" in r["from"][0]]
    assert peers and peers[0]["from"][0]["podSelector"]["matchLabels"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()
    assert any("podSelector" in r["to"][0] and r["ports"] == [{"port": 8088, "protocol": "TCP"}]
               for r in policy["egress"])
    # One replica: no peers to forward to, and no enrolment without a hub.
    single = objects(render(helm_render, ALL_ON).stdout)
    single_env = {e["name"] for e in one(single, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "GATEWAY_REPLICAS__PEER_URL" not in single_env and "GATEWAY_REPLICAS__COUNT" in single_env
    assert "initContainers" not in one(single, "StatefulSet")["spec"]["template"]["spec"]


@pytest.mark.parametrize(("answer", "status"), [(0, 0), (1, 0), (2, 2)])
def test_the_enrolment_step_uses_the_replicas_own_token_once(helm_render, tmp_path, answer, status):
    """The init container's script, run by sh with a stand-in `gateway`: token-N for pod NAME-N, enrolled already
    (exit 1) is fine, a refusal (exit 2) stops the pod with it."""
    sts = one(objects(render(helm_render, REPLICATED).stdout), "StatefulSet")
    script = sts["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    tokens = tmp_path / "enroll"
    tokens.mkdir()
    for n in range(3):
        (tokens / f"token-{n}").write_text(f"tok-{n}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gateway").write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\ncat > "{tmp_path}/stdin"\n'
                                     f"exit {answer}\n")
    (bin_dir / "gateway").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "POD_NAME": "rel-exchange-room-gateway-2",
           "HUB_URL": "https://hub.example.com"}
    done = subprocess.run(["/bin/sh", "-c", script.replace("/etc/gateway/enroll", str(tokens))], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == status, done.stderr
    assert (tmp_path / "stdin").read_text() == "tok-2"
    assert (tmp_path / "args").read_text().split() == ["enroll", "--hub", "https://hub.example.com", "--token", "-",
                                                       "--name", "rel-exchange-room-gateway-2"]
    (tokens / "token-2").unlink()  # a replica without a token (not given one): it starts without enrolling
    (tmp_path / "stdin").unlink()
    done = subprocess.run(["/bin/sh", "-c", script.replace("/etc/gateway/enroll", str(tokens))], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "not enrolling" in done.stdout and not (tmp_path / "stdin").exists()

"""The ``gateway`` command: the simulator as a subprocess, as a developer or a CI job would run it."""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from exchangelib import IMPERSONATION, NTLM, Account, Configuration, Credentials, EWSDateTime
from exchangelib.protocol import close_connections

from gateway import bench
from gateway.bench import BenchArgs, Results, one_at_a_time, run_scale, scale_command, simulator_command
from gateway.cli import build_parser
from gateway.simulator.serve import simulator_config
from tests.conftest import TZ

ENV = {**os.environ, "GATEWAY_LOG_FORMAT": "json"}


def _first_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no line on stdout within {timeout} s")
    return proc.stdout.readline()


def test_simulator_prints_one_json_line_serves_ews_and_stops_cleanly_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "simulator", "--port", "0", "--rooms", "3",
                             "--users", "3", "--activity", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        ready = json.loads(_first_line(proc))
        assert ready["ews_url"].startswith("http://127.0.0.1:") and ready["ews_url"].endswith("/EWS/Exchange.asmx")
        assert [r["email"] for r in ready["rooms"]] == ["room1@contoso.com", "room2@contoso.com",
                                                          "room3@contoso.com"]
        assert len(ready["users"]) == 3 and all(u["password"] for u in ready["users"])
        assert ready["control_url"].endswith("/control") and ready["control_token"]

        svc = ready["service_account"]
        cfg = Configuration(service_endpoint=ready["ews_url"], credentials=Credentials(svc["username"],
                                                                                          svc["password"]),
                            auth_type=NTLM)
        room = Account("room1@contoso.com", config=cfg, access_type=IMPERSONATION, autodiscover=False,
                       default_timezone=TZ)
        lo = EWSDateTime.now(TZ)
        bookings = list(room.calendar.view(start=lo, end=lo + timedelta(days=90)).only("subject", "start"))
        assert bookings, "the room should hold seeded bookings"
        close_connections()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out == "", "stdout carries the one JSON line only"
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "simulator.ready" in events and events[-1] == "simulator.stopped"


def test_help_reads_well() -> None:
    top = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0
    assert "simulator" in top.stdout and "simulator-bench" in top.stdout
    sim = subprocess.run([sys.executable, "-m", "gateway", "simulator", "--help"], capture_output=True, text=True,
                         timeout=30)
    assert sim.returncode == 0
    for option in ("--port", "--rooms", "--users", "--seed", "--activity", "--rba-delay", "--tls", "--log-format"):
        assert option in sim.stdout
    bad = subprocess.run([sys.executable, "-m", "gateway", "simulator"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--port" in bad.stderr


def test_the_simulator_skips_checking_its_answers_against_the_schema_only_when_a_benchmark_asks() -> None:
    plain = build_parser().parse_args(["simulator", "--port", "0"])
    fast = build_parser().parse_args(["simulator", "--port", "0", "--no-response-validation"])
    assert simulator_config(plain).validate_responses is True
    assert simulator_config(fast).validate_responses is False
    assert "--no-response-validation" in simulator_command(BenchArgs(rooms=10))


def test_bench_runs_once_per_room_count_each_in_a_process_of_its_own_and_reports_cost_per_booking() -> None:
    args = build_parser().parse_args(["bench", "--rooms", "100,1000,10000", "--only", "sync"])
    assert args.rooms == (100, 1000, 10000)
    for bad in ("0,10", "10,x", ""):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "--rooms", bad])
    ran: list[list[str]] = []

    def one(cmd: list[str]) -> str:
        ran.append(cmd)
        rooms = int(cmd[cmd.index("--rooms") + 1])
        return "a line of something else\n" + json.dumps({"import": {"rooms": rooms}})
    runs = run_scale(BenchArgs(rooms=100, scale=(100, 1000), concurrency=20), one)
    assert [r["import"]["rooms"] for r in runs] == [100, 1000]
    assert all(c[c.index("--only") + 1] == "sync" and "--json" in c for c in ran)
    assert all(c[c.index("--concurrency") + 1] == "20" for c in ran)  # each count's process keeps it
    assert "--no-restart" not in ran[0] and "--no-restart" in scale_command(BenchArgs(restart=False), 100)
    assert build_parser().parse_args(["bench", "--no-restart"]).restart is False
    assert build_parser().parse_args(["bench"]).concurrency == 10
    for bad in ("0", "28"):  # Exchange allows 27 requests in flight per service account
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "--concurrency", bad])

    imp = Results(rooms=10, bookings=2000, import_seconds=4.0, import_cpu_gateway=1.0, import_cpu_simulator=0.5,
                  import_ews_calls=50, import_rss_mb=99.94).as_dict()["import"]
    assert imp["cpu_ms_per_booking"] == {"gateway": 0.5, "simulator": 0.25}
    assert imp["ews_calls"] == 50 and imp["rss_mb"] == 99.9 and imp["cpu_seconds"] == {"gateway": 1.0,
                                                                                     "simulator": 0.5}


def test_a_second_benchmark_waits_for_the_first_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Two benchmarks at once share the cores and both report wrong figures: the second waits, saying so; the
    processes the first starts itself (one per room count) share its lock instead of waiting for it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("GATEWAY_BENCH_LOCK_OWNER", raising=False)
    first_holds, first_may_end, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with one_at_a_time():
            order.append("first")
            first_holds.set()
            first_may_end.wait(10)
            order.append("first ends")
    t = threading.Thread(target=first)
    t.start()
    assert first_holds.wait(10)
    assert os.environ["GATEWAY_BENCH_LOCK_OWNER"] == str(os.getpid())
    monkeypatch.delenv("GATEWAY_BENCH_LOCK_OWNER")  # as another process would see it: no lock of its own
    second_done = threading.Event()

    def second() -> None:
        with one_at_a_time():
            order.append("second")
        second_done.set()
    u = threading.Thread(target=second)
    u.start()
    assert not second_done.wait(0.5)  # it waits while the first holds the lock
    first_may_end.set()
    t.join(10)
    u.join(10)
    assert order == ["first", "first ends", "second"]
    assert f"waiting for the benchmark already running on this machine (pid {os.getpid()}) to end" in \
        capsys.readouterr().err
    assert oct((tmp_path / bench.LOCK_NAME).stat().st_mode & 0o777) == "0o600"

    monkeypatch.setenv("GATEWAY_BENCH_LOCK_OWNER", "1")  # a benchmark's own child: in at once
    with one_at_a_time():
        pass


def test_the_sync_bench_runs_tiny_and_a_restart_on_its_store_catches_up_then_reads_every_room_again() -> None:
    """`gateway bench --only sync`, a few rooms for a few seconds: the import, the changes, then a new gateway on
    the store the first one left, with a meeting booked while none ran: its event comes, every room catches up and
    is read in full again, and nothing else is emitted (nothing else changed)."""
    run = subprocess.run([sys.executable, "-m", "gateway", "bench", "--only", "sync", "--rooms", "3", "--rate", "2",
                          "--duration", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    imp, restart = out["import"], out["restart"]
    assert imp["rooms"] == 3 and imp["bookings"] > 0 and imp["ews_calls"] >= 3
    assert out["changes"] == 4 and out["missed_changes"] == 0
    assert restart["other_booking_events"] == 0, "a restart repaired what was not broken"
    assert 0 < restart["change_made_while_down_seconds"] <= restart["seconds"]
    assert 0 < restart["caught_up_seconds"] <= restart["seconds"]
    # Per room: the sync from its stored state (which verifies it), its window, its meetings' details; the
    # subscriptions and the syncs their marks set off may come before or after every room is read.
    assert 3 * 3 <= restart["ews_calls"] <= restart["ews_calls_until_idle"] <= 3 * 6 + 1
    assert restart["cpu_seconds"]["gateway"] > 0 and restart["cpu_ms_per_booking"]["gateway"] > 0
    assert Results(rooms=3).as_dict()["restart"] is None  # (--no-restart)


def test_the_pipeline_bench_runs_tiny_and_its_reconciliation_finds_nothing_changed() -> None:
    """`scripts/bench_pipeline.py` (README "Benchmarks"), a room captured and replayed three times: every booking
    of the import is one created event, and the reconciliation of the same rooms reads them all again, commits as
    the coordinator does, and finds nothing to publish."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_pipeline.py"
    run = subprocess.run([sys.executable, str(script), "--rooms", "3", "--capture", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    imp, rec = out["import"], out["reconcile"]
    assert out["rooms"] == 3 and imp["bookings"] > 0 and imp["bookings"] % 3 == 0
    assert imp["events"] == imp["bookings"] and rec["bookings"] == imp["bookings"] and rec["events"] == 0
    stages = ("mapping", "privacy", "known", "plan", "events", "commit")
    for figures in (imp["us_per_booking"], rec["us_per_booking"]):
        assert all(figures[s] >= 0 for s in stages) and figures["total"] > 0


def test_the_function_profile_of_a_bench_names_each_stage_and_adds_up() -> None:
    """`scripts/bench_functions.py` (README "Benchmarks") over a tiny import: every default stage is timed and
    called, the stages' sum is within the process's CPU, and a function another module imported by name is timed
    there too (the coordinator calls plan through its own name)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_functions.py"
    bench = ["--rooms", "2", "--only", "sync", "--duration", "1", "--no-restart", "--json"]
    run = subprocess.run([sys.executable, str(script), *bench], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    imported = json.loads(run.stdout.strip().splitlines()[-1])["import"]["bookings"]
    assert imported > 0
    table = run.stderr[run.stderr.index("CPU by function"):].splitlines()
    rows = {line[2:26].strip(): line[26:].split() for line in table[2:] if line.startswith("  ") and line[2] != " "}
    spec = importlib.util.spec_from_file_location("bench_functions", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (definitions only: its work is under `if __name__ == "__main__"`)
    for label, _ in module.STAGES:
        assert label in rows, f"{label}: never called (a function imported by name was not replaced there?)"
        seconds, calls = float(rows[label][0]), int(rows[label][1])
        assert calls > 0 and seconds >= 0, label
    assert float(rows["(sum)"][0]) > 0
    assert f"; {imported} bookings imported" in run.stderr
    process = float(table[-1].split("process CPU ")[1].split(" s;")[0])
    assert float(rows["(sum)"][0]) <= process * 1.05

    named = subprocess.run([sys.executable, str(script), "--functions", "gateway.sync.engine:plan", *bench],
                           capture_output=True, text=True, timeout=300)
    assert named.returncode == 0, named.stderr[-3000:]
    lines = [line.split() for line in named.stderr.splitlines() if line.startswith("  plan ")]
    assert len(lines) == 1 and int(lines[0][2]) > 0, named.stderr[-2000:]


def test_the_graph_bench_runs_tiny_and_reports_both_phases_under_graph() -> None:
    """`gateway bench --only graph`, a few online rooms for a few seconds: each phase imports every room, hears of
    the changes (through the hub, then by polling) and counts the Graph calls they cost."""
    run = subprocess.run([sys.executable, "-m", "gateway", "bench", "--only", "graph", "--rooms", "3", "--rate", "2",
                          "--duration", "4", "--poll-interval", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(out) == {"graph"}, "only the graph part ran"
    graph = out["graph"]
    assert set(graph) == {"notifications", "polling"}
    for mode, phase in graph.items():
        assert phase["mode"] == mode
        assert phase["rooms_by_mode"][mode] == 3, f"every room heard of changes by {mode}"
        assert phase["import"]["rooms"] == 3 and phase["import"]["bookings"] > 0
        assert phase["import"]["seconds"] > 0 and phase["import"]["graph_calls"] >= 3
        per = phase["import"]["cpu_ms_per_booking"]  # as the EWS sync part reports it
        assert per["gateway"] > 0 and per["simulator"] >= 0 and phase["import"]["rss_mb"] > 0
        assert phase["changes"] == 8 and phase["missed_changes"] == 0
        lat = phase["latency_ms"]
        assert lat["samples"] == 8 and 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] < 20_000
        assert phase["graph_calls"] > 0 and phase["graph_calls_per_change"] > 0
        assert sum(phase["graph_calls_by_operation"].values()) == phase["graph_calls"]
        assert phase["graph_calls_by_operation"]["delta"] > 0 and phase["delta_calls_per_s"] > 0
        assert phase["cpu_seconds"]["gateway"] >= 0 and phase["cpu_seconds"]["simulator"] >= 0
    assert graph["polling"]["poll_interval_s"] == 1 and graph["notifications"]["poll_interval_s"] is None
    assert graph["notifications"]["hub_posts"]["forwarded"] > 0, "the changes came as posts through the hub"
    assert graph["polling"]["hub_posts"] is None
    assert (graph["notifications"]["cpu_of"], graph["polling"]["cpu_of"]) == ("gateway and hub", "gateway")
    text = subprocess.run([sys.executable, "-m", "gateway", "bench", "--help"], capture_output=True, text=True,
                          timeout=30).stdout
    assert "graph" in text and "--poll-interval" in text

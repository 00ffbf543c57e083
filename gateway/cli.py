"""The ``gateway`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from gateway import __version__, apikeys, credentials
from gateway.config import CONFIG_PATH_ENV
from gateway.errors import GatewayError
from gateway.relay import enroll

log = structlog.get_logger("gateway.cli")

DESCRIPTION = "On-premise Exchange room-calendar gateway."
EPILOG = "Run `gateway COMMAND --help` for a command's options and examples."

SIMULATOR_EPILOG = """\
Once it is ready, the simulator prints exactly one JSON line on stdout:
  {"ews_url": ..., "service_account": {"username": ..., "password": ...}, "users": [{"email", "password"}...],
   "rooms": [{"email", "name", "source": "ews"|"graph"}...], "control_url": ..., "control_token": ...,
   "graph": {"url", "authority", "tenant_id", "client_id", "client_secret", "ca_bundle", "users"}}
Rooms and users whose source is "graph" live in Exchange Online: reach them through Graph (msal client
credentials against authority, TLS verified with ca_bundle), not EWS.
Logs (and the human-readable hints) go to stderr. It runs until SIGINT or SIGTERM.

Point exchangelib at ews_url with the service account (NTLM or Basic; it impersonates the rooms). Drive the
organisation through control_url with "Authorization: Bearer <control_token>", for example:
  curl -H "Authorization: Bearer $TOKEN" $CONTROL_URL/state
  curl -H "Authorization: Bearer $TOKEN" -X POST $CONTROL_URL/meetings -d '{"organizer": "alice@contoso.com",
       "rooms": ["room1@contoso.com"], "start": "2030-01-07T10:00", "end": "2030-01-07T11:00", "wait": true}'

Examples:
  gateway simulator --port 8080 --rooms 20 --users 30
  gateway simulator --port 0 --activity 0 --log-format json
"""

DEMO_EPILOG = """\
Nothing to configure: the simulator listens on a free local port, the gateway's store is a temporary file; both
go when the demo ends, however it ends. Once the calendars are imported it prints an API key made for the demo,
curl lines to try and a booking command for a slot that is free (the hints come back every 30 lines), e.g.:
  curl -s -H "Authorization: Bearer $KEY" localhost:8088/v1/rooms
  curl -N -H "Authorization: Bearer $KEY" localhost:8088/v1/events    (SSE; resume with Last-Event-ID)
"""

RUN_EPILOG = """\
Before the first run, store the service account's password in the vault:
  gateway credentials set exchange --config gateway.yaml
Then:
  gateway run --config gateway.yaml
  gateway rooms --config gateway.yaml       (state of every room, and the remedy for problems)
Local API clients need a key:
  gateway api-keys create "room displays" --scope read --config gateway.yaml
To relay to a booking vendor's hub, enroll once:
  gateway enroll --hub https://HUB --token TOKEN --config gateway.yaml
"""

BENCH_EPILOG = """\
(a) starts `gateway simulator` in a subprocess pinned to one CPU core and drives it from this process, pinned
    to another core, with an aiohttp client over keep-alive connections (Basic auth, impersonating rooms):
    small GetFolder and FindItem/CalendarView calls. Prints calls per second and latency percentiles.
(b) builds N room mailboxes with a year of bookings in a fresh subprocess and prints its peak RSS (VmHWM), the
    items and occurrences it holds and how long seeding took.

Example:
  gateway simulator-bench --calls 20000 --concurrency 16 --rooms 10000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    demo = subs.add_parser("demo", help="see it work: the simulator, the gateway against it, bookings live",
                           description="Start the Exchange simulator with seeded rooms and live activity, run the "
                                       "gateway against it, and show the relayed booking events as they happen.",
                           epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--rooms", type=_count, default=5, metavar="N", help="rooms (default: %(default)s)")
    demo.add_argument("--users", type=_count, default=10, metavar="N", help="people (default: %(default)s)")
    demo.add_argument("--activity", type=_rate, default=0.5, metavar="RATE",
                      help="booking changes per second in the simulated Outlook (default: %(default)s)")
    demo.add_argument("--port", type=int, default=8088, help="port of the gateway's local API (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=1, metavar="S", help="seed of the simulation (default: 1)")
    _logging_options(demo, default_level="warning")

    run = subs.add_parser("run", help="run the gateway with a configuration file",
                          description="Run the gateway: sync the configured rooms from Exchange and serve the local "
                                      "API (rooms, bookings, the event stream, metrics).",
                          epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_option(run)
    _logging_options(run)

    doctor = subs.add_parser("doctor", help="check the configuration, the vault, Exchange and every room",
                             description="Check everything the gateway needs by doing it: read the configuration, "
                                         "open the vault, log on to Exchange once, then check every room with what "
                                         "the gateway will use (its mailbox, a sync, a subscription of the "
                                         "configured kind, availability). One line per check, with a stable key "
                                         "and the remedy; exit 0 when none failed.")
    _config_option(doctor)
    _logging_options(doctor, default_level="error")

    rooms = subs.add_parser("rooms", help="list the rooms, their state and what to do about problems",
                            description="List the rooms the gateway knows, their state (verified, "
                                        "impersonation_denied, mailbox_not_found, ...) and the remedy. `rooms forget "
                                        "ROOM` withdraws a room taken out of the configuration: consumers get a "
                                        "deletion for each of its bookings (run it with the gateway stopped, before "
                                        "starting it again; a room that just leaves the configuration is dropped "
                                        "without telling consumers, as when it moves to another gateway).")
    rooms.add_argument("action", nargs="?", choices=("forget",), help="forget: withdraw ROOM and its bookings")
    rooms.add_argument("room", nargs="?", help="the room's e-mail address (with forget)")
    _config_option(rooms)
    _logging_options(rooms, default_level="warning")

    directory = subs.add_parser("directory", help="what the directory holds: people, rooms, credentials' expiry",
                                description="Read the configured directory (Active Directory over LDAP) now and "
                                            "show its people, its rooms with their state in this gateway, and when "
                                            "the credentials it can tell of expire (its bind account's password).")
    directory.add_argument("--json", action="store_true",
                           help="one JSON object with the lists people, rooms and credentials")
    _config_option(directory)
    _logging_options(directory, default_level="warning")

    once = subs.add_parser("sync-once", help="verify one room and bring it up to date now",
                           description="Verify one room and sync it now (import on first use, otherwise the "
                                       "changes since the last sync and a full comparison); prints what changed.")
    once.add_argument("room", help="the room's e-mail address")
    _config_option(once)
    _logging_options(once, default_level="warning")

    gbench = subs.add_parser("bench", help="measure the gateway: import, change-to-event latency, EWS calls, "
                                           "tunnel events/s, command round trips",
                             description="Run the simulator (on one core) and the gateway (on the other) and print "
                                         "the import time, change-to-event latency percentiles under a steady "
                                         "rate of changes, EWS calls per change and the gateway's peak RSS; then "
                                         "events per second through one tunnel to a local hub, and the round trip "
                                         "of create commands sent through the hub with a slow booking attendant.")
    gbench.add_argument("--rooms", type=_counts, default=(1000,), metavar="N[,N...]",
                        help="rooms (default: 1000); several counts, e.g. 100,1000,10000, run the import and "
                             "steady state once per count, each in a process of its own, and report import "
                             "seconds, CPU (gateway, simulator) per booking, EWS calls and RSS for each")
    gbench.add_argument("--rate", type=_rate, default=20.0, metavar="RATE",
                        help="changes per second in the steady phase (default: %(default)s)")
    gbench.add_argument("--duration", type=_seconds, default=30.0, metavar="SECONDS",
                        help="seconds of steady changes (default: %(default)s)")
    gbench.add_argument("--latency-ms", type=float, default=20.0, metavar="MS",
                        help="simulated Exchange latency per call (default: %(default)s)")
    gbench.add_argument("--concurrency", type=_concurrency, default=10, metavar="N",
                        help="EWS requests the gateway keeps in flight, as exchange.max_concurrent_requests (1-27; "
                             "default: %(default)s, as Microsoft advises for one service account)")
    gbench.add_argument("--events", type=int, default=50_000, metavar="N",
                        help="events pushed through one tunnel to the hub; 0 skips it (default: %(default)s)")
    gbench.add_argument("--commands", type=int, default=100, metavar="N",
                        help="create commands sent through the hub, 5 at a time; 0 skips it (default: %(default)s)")
    gbench.add_argument("--rba-delay", type=_seconds, default=0.5, metavar="SECONDS",
                        help="the booking attendant's delay for the commands part (default: %(default)s)")
    gbench.add_argument("--only", choices=("sync", "relay", "graph"),
                        help="run one part: sync (import, change latency, EWS calls), relay (tunnel, commands) or "
                             "graph (online rooms through Microsoft Graph: import, change latency and Graph calls "
                             "per change, with notifications through a local hub, then with polling; not in the "
                             "default run, as it imports the rooms twice; in --json under graph, or graph_scale "
                             "with several --rooms)")
    gbench.add_argument("--poll-interval", type=_seconds, default=5.0, metavar="SECONDS",
                        help="the graph part's delta polling interval in its polling phase (default: %(default)s)")
    gbench.add_argument("--no-restart", dest="restart", action="store_false",
                        help="skip the sync part's last phase: a new gateway started on the store the first one "
                             "left, measured until every room is read again (seconds, CPU, EWS calls, and the "
                             "booking events it emits, which should be none)")
    gbench.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _logging_options(gbench, default_level="warning")

    # The logging options go on each subcommand (`gateway api-keys create NAME --log-level debug`), like --config.
    for group in (credentials.register_cli(subs), apikeys.register_cli(subs)):
        for leaf in _leaves(group):
            _logging_options(leaf, default_level="warning")
    _logging_options(enroll.register_cli(subs), default_level="warning")
    _logging_options(enroll.register_rotate_cli(subs), default_level="warning")
    from gateway.hub import cli as hubcli  # the hub is its own product; only its CLI is mounted here

    hubcli.register_cli(subs)  # each hub subcommand carries the logging options itself
    _logging_options(subs.add_parser(
        "config-schema", help="print the JSON Schema of the configuration file",
        description="Print the JSON Schema of the YAML configuration, generated from the settings' models. The "
                    "published copy is regenerated with: gateway config-schema > gateway/schemas/config.v1.json"),
        default_level="warning")

    sim = subs.add_parser("simulator", help="run the Exchange 2016 (EWS) simulator with seeded rooms, people and "
                                            "a year of bookings",
                          description="Run the built-in Exchange 2016 (EWS) simulator.", epilog=SIMULATOR_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sim.add_argument("--port", type=int, required=True, help="TCP port to listen on (0 picks a free one)")
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sim.add_argument("--rooms", type=_count, default=10, metavar="N",
                     help="room mailboxes to create (default: %(default)s)")
    sim.add_argument("--users", type=_count, default=20, metavar="N",
                     help="user mailboxes to create (default: %(default)s)")
    sim.add_argument("--seed", type=int, default=1, metavar="S",
                     help="seed for bookings and activity (default: %(default)s)")
    sim.add_argument("--activity", type=_rate, default=0.5, metavar="RATE",
                     help="live booking changes per second; 0 for none (default: %(default)s)")
    sim.add_argument("--rba-delay", type=_seconds, default=2.0, metavar="SECONDS",
                     help="how long a room's booking attendant takes to answer (default: %(default)s)")
    sim.add_argument("--no-bookings", action="store_true", help="start with empty calendars (no seeded year)")
    sim.add_argument("--latency-ms", type=float, default=0.0, metavar="MS",
                     help="added to every EWS call, like a loaded server (default: %(default)s)")
    sim.add_argument("--no-response-validation", action="store_true",
                     help="do not check answers against the EWS schema (for benchmarks; the test suite checks them)")
    sim.add_argument("--tls", action="store_true",
                     help="serve HTTPS with a certificate generated at start-up (its PEM is in the JSON line)")
    sim.add_argument("--graph-rooms", type=int, default=None, metavar="N",
                     help="rooms (the last N) that live in Exchange Online, reached through Graph (default: a third)")
    sim.add_argument("--graph-users", type=int, default=None, metavar="N",
                     help="users (the last N) that live in Exchange Online (default: a third)")
    sim.add_argument("--graph-port", type=int, default=0, metavar="PORT",
                     help="TCP port of the Graph side (HTTPS; default: a free one)")
    sim.add_argument("--graph-notify-ca", default=None, metavar="PEM",
                     help="CA bundle that verifies Graph notification URLs, e.g. a test hub's (default: system CAs)")
    _logging_options(sim)

    bench = subs.add_parser("simulator-bench", help="measure the simulator: EWS calls/s on one core, memory for "
                                                    "10,000 rooms",
                            description="Measure the EWS simulator: throughput on one core, memory for many rooms.",
                            epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--calls", type=_count, default=10_000, metavar="N",
                       help="EWS calls to time (default: %(default)s)")
    bench.add_argument("--concurrency", type=_count, default=16, metavar="N",
                       help="requests in flight, one keep-alive connection each (default: %(default)s)")
    bench.add_argument("--rooms", type=_count, default=10_000, metavar="N",
                       help="rooms with a year of bookings for the memory measurement (default: %(default)s)")
    bench.add_argument("--ews-rooms", type=_count, default=100, metavar="N",
                       help="rooms (with a year of bookings) in the simulator the calls go to (default: %(default)s)")
    bench.add_argument("--skip-throughput", action="store_true", help="only measure memory")
    bench.add_argument("--skip-memory", action="store_true", help="only measure throughput")
    bench.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _logging_options(bench, default_level="info")
    for p in _parsers(parser):
        p.formatter_class = _HelpFormatter
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:  # a subcommand without a description shows its summary
                    child = action.choices[choice.dest]
                    if not child.description and choice.help:
                        child.description = f"{choice.help[0].upper()}{choice.help[1:]}."
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions of one paragraph are wrapped to the terminal; text laid out over several lines (the examples
    in an epilog) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from _parsers(child)


def _leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run something (no subcommands of their own)."""
    for p in _parsers(parser):
        if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
            yield p


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="PATH",
                   help=f"the configuration file (default: ${CONFIG_PATH_ENV}, else the built-in defaults and "
                        "GATEWAY_* variables); an example: config/gateway.example.yaml")


def _logging_options(p: argparse.ArgumentParser, default_level: str = "info") -> None:
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                   help="log format on stderr: console on a terminal, JSON otherwise (default: %(default)s)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=default_level,
                   help="log level (default: %(default)s)")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("must be a count or counts separated by commas (100,1000)") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("every count must be 1 or more")
    return counts


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 0 and 1000 changes per second")
    return value


def _concurrency(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 27:
        raise argparse.ArgumentTypeError("must be between 1 and 27 (Exchange's EWSMaxConcurrency)")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from gateway.observability.logging import configure_logging

    configure_logging(args.log_level, args.log_format)
    _say_if_no_config(args)
    try:
        return dispatch(args)
    except GatewayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`gateway rooms | head`): say nothing more, as other Unix tools do.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "simulator":
        from gateway.simulator.serve import run_simulator

        return asyncio.run(run_simulator(args))
    if args.command == "simulator-bench":
        from gateway.simulator.bench import run_bench

        return run_bench(args)
    if args.command == "credentials":
        return credentials.run_cli(args)
    if args.command == "api-keys":
        return apikeys.run_cli(args)
    if args.command == "enroll":
        return enroll.run_cli(args)
    if args.command == "rotate-key":
        return enroll.run_rotate_cli(args)
    if args.command == "hub":
        from gateway.hub import cli as hubcli

        return hubcli.run_cli(args)
    if args.command == "config-schema":
        from gateway.config import config_schema

        print(json.dumps(config_schema(), indent=2, ensure_ascii=False))
        return 0
    if args.command == "demo":
        from gateway import demo

        return asyncio.run(demo.run(rooms=args.rooms, users=args.users, activity=args.activity, port=args.port,
                                    seed=args.seed))
    if args.command == "run":
        from gateway import service

        return asyncio.run(service.run(_config_path(args)))
    if args.command == "doctor":
        from gateway import service

        return asyncio.run(service.doctor(_config_path(args)))
    if args.command == "rooms":
        from gateway import service

        if args.action == "forget":
            if not args.room:
                raise GatewayError("`gateway rooms forget` needs the room's address", key="usage",
                                   remedy="gateway rooms forget ROOM --config FILE")
            return service.forget(_config_path(args), args.room)
        return service.rooms(_config_path(args))
    if args.command == "directory":
        from gateway import directory_service

        return directory_service.run_cli(_config_path(args), args.json, os.environ)
    if args.command == "sync-once":
        from gateway import service

        return asyncio.run(service.sync_once(_config_path(args), args.room))
    if args.command == "bench":
        from gateway import bench

        return bench.main(bench.BenchArgs(rooms=args.rooms[0], scale=args.rooms, rate=args.rate, duration=args.duration,
                                          latency_ms=args.latency_ms, concurrency=args.concurrency,
                                          as_json=args.json,
                                          sync=args.only in (None, "sync"), relay=args.only in (None, "relay"),
                                          events=args.events, commands=args.commands, rba_delay=args.rba_delay,
                                          graph=args.only == "graph", poll_interval=args.poll_interval,
                                          restart=args.restart))
    raise SystemExit(f"unknown command {args.command}")


CONFIGURED_COMMANDS = ("run", "doctor", "rooms", "directory", "sync-once", "credentials", "api-keys", "enroll",
                       "rotate-key")


def _say_if_no_config(args: argparse.Namespace) -> None:
    """A command that reads the configuration says so when it got none: forgetting --config otherwise shows only as
    settings that are missing, or as a store and a vault in unexpected places."""
    if args.command in CONFIGURED_COMMANDS and getattr(args, "config", None) is None \
            and not os.environ.get(CONFIG_PATH_ENV):
        log.warning("config.not_given", message=f"no --config given and ${CONFIG_PATH_ENV} is not set: using the "
                                                "built-in defaults and GATEWAY_* environment variables",
                    remedy="pass --config PATH (an example: config/gateway.example.yaml)")


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    env = os.environ.get(CONFIG_PATH_ENV)
    return Path(env) if env else None



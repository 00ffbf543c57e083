"""``gateway hub``: run the reference hub, and administer it directly on its data directory.

    gateway hub serve --data /var/lib/hub --listen 0.0.0.0:8443 --cert hub.pem --key hub.key
    gateway hub customer add contoso --name "Contoso Ltd" --data /var/lib/hub
    gateway hub token contoso --ttl 1h --data /var/lib/hub       # prints the single-use enrollment token
    gateway hub api-key contoso --data /var/lib/hub               # prints a vendor API key (shown once)
    gateway hub gateways --data /var/lib/hub
    gateway hub revoke gw_XXXX --data /var/lib/hub                # a running hub ends the live session too

The administration commands open the hub's SQLite file themselves, so they work whether or not the hub runs
(and without the admin token: access to the data directory is the authority).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from gateway.errors import ConfigError, GatewayError
from gateway.hub.settings import GRAPH_BURST, GRAPH_RATE
from gateway.hub.store import DB_NAME, HubStore
from gateway.security.secret import Secret

DATA_ENV = "GATEWAY_HUB_DATA"
ADMIN_TOKEN_ENV = "GATEWAY_HUB_ADMIN_TOKEN"
_TTL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

HUB_EPILOG = f"""\
A first hub, step by step:
  export {ADMIN_TOKEN_ENV}=$(openssl rand -base64 32)
  gateway hub serve --data ./hub --listen 0.0.0.0:8443 --cert hub.pem --key hub.key &
  gateway hub customer add contoso --name "Contoso Ltd" --data ./hub
  gateway hub token contoso --data ./hub        (give it to Contoso's Exchange admin for `gateway enroll`)
  gateway hub api-key contoso --data ./hub      (for the booking system: Authorization: Bearer <key>)
The protocol, the vendor API and the webhooks are described in docs/relay-protocol.md.
"""

SERVE_EPILOG = f"""\
Gateways dial wss://HOST:PORT/v1/tunnel; the vendor API is under https://HOST:PORT/v1/customers/CUSTOMER/ and the
admin API under https://HOST:PORT/admin/v1/ (Authorization: Bearer <admin token>, read from ${ADMIN_TOKEN_ENV} or
the variable named by --admin-token-env; without one the admin API is off and the `gateway hub` commands do the
administration on --data). Prometheus metrics are at https://HOST:PORT/metrics, with the admin token too.

Examples:
  gateway hub serve --data /var/lib/hub --cert /etc/hub/tls.pem --key /etc/hub/tls.key \\
      --public-url https://hub.vendor.example --retention-days 90
  gateway hub serve --data ./hub --listen 127.0.0.1:8080 --insecure-http     (development only)
"""


def parse_ttl(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d`` or plain seconds."""
    m = _TTL_RE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 30m, 1h, 2d or 3600")
    return timedelta(seconds=float(m.group(1)) * _TTL_UNITS[m.group(2)])


def parse_days(text: str) -> int:
    """A whole number of days, 0 or more."""
    try:
        days = int(text)
    except ValueError:
        days = -1
    if days < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days; write e.g. 30, or 0 to keep events "
                                         "for ever")
    return days


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all addresses)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:8443 or [::]:8443)")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range")
    return host, port


# -- argparse ----------------------------------------------------------------------------------------------------
def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``hub {serve,customer,token,api-key,gateways,revoke}``; dispatch with :func:`run_cli`. Every subcommand
    carries --log-format/--log-level itself (the gateway's main() reads them)."""
    parser = subparsers.add_parser(
        "hub", help="run the reference relay hub (what a booking vendor runs in its cloud) and administer it",
        description="The reference relay hub: gateways dial it over a TLS WebSocket and relay their rooms' events; "
                    "the booking vendor reads them (REST, SSE, webhooks) and sends booking commands back.",
        epilog=HUB_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="hub_command", required=True, metavar="{serve,customer,token,api-key,gateways,"
                                                                           "revoke}")

    serve = sub.add_parser("serve", help="run the hub", description="Run the hub until SIGINT or SIGTERM.",
                           epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--listen", type=parse_listen, default=("0.0.0.0", 8443), metavar="HOST:PORT",
                       help="address to listen on (default: 0.0.0.0:8443)")
    serve.add_argument("--cert", type=Path, metavar="FILE", help="PEM certificate (chain) the hub presents")
    serve.add_argument("--key", type=Path, metavar="FILE", help="PEM private key of the certificate")
    serve.add_argument("--public-url", metavar="URL",
                       help="the https:// address gateways reach the hub at, for the tunnel_url answered at "
                            "enrollment and the Graph notification URLs told in welcome (default: the address each "
                            "request came to)")
    serve.add_argument("--admin-token-env", metavar="VAR", default=None,
                       help=f"environment variable holding the admin API token (default: {ADMIN_TOKEN_ENV}; unset: "
                            "the admin API is off)")
    serve.add_argument("--command-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="how long a command waits for the gateway's result (default: %(default)s)")
    serve.add_argument("--webhook-ca", type=Path, metavar="FILE",
                       help="PEM CAs to trust for webhook endpoints (default: the system store)")
    serve.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL",
                       help="SQLite durability: NORMAL survives a crash of the hub, FULL also a power loss "
                            "(default: %(default)s)")
    serve.add_argument("--retention-days", type=parse_days, default=30, metavar="N",
                       help="delete stored events older than N days, hourly (events a webhook has not delivered "
                            "yet are kept, and so is the rooms/bookings view); 0 keeps them for ever "
                            "(default: %(default)s)")
    serve.add_argument("--graph-rate", type=float, default=GRAPH_RATE, metavar="PER_SECOND",
                       help="Microsoft Graph notifications accepted per second for one gateway; beyond it (and the "
                            "burst) the hub answers 429 (default: %(default)s)")
    serve.add_argument("--graph-burst", type=int, default=GRAPH_BURST, metavar="N",
                       help="notifications one gateway may get at once before --graph-rate applies "
                            "(default: %(default)s)")
    serve.add_argument("--insecure-http", action="store_true",
                       help="serve plain HTTP; only allowed on a loopback address, for development")

    customer = sub.add_parser("customer", help="manage customers (one per gateway installation)",
                              description="Manage the hub's customers.")
    csub = customer.add_subparsers(dest="customer_command", required=True, metavar="{add,list}")
    add = csub.add_parser("add", help="add a customer", description="Add a customer; its gateways enroll with "
                                                                     "tokens issued for it.")
    add.add_argument("id", help="the customer's id: lower-case letters, digits, '-' and '_', e.g. contoso")
    add.add_argument("--name", help="a display name (default: the id)")
    clist = csub.add_parser("list", help="list the customers")

    token = sub.add_parser("token", help="issue a single-use enrollment token for a customer's gateway",
                           description="Issue a single-use, expiring enrollment token. The token goes to standard "
                                       "output alone (for scripts); the details to standard error.")
    token.add_argument("customer", help="the customer's id")
    token.add_argument("--ttl", type=parse_ttl, default=timedelta(hours=1), metavar="DURATION",
                       help="how long the token stays valid: 30m, 1h, 2d … (default: 1h)")

    api_key = sub.add_parser("api-key", help="issue an API key for the vendor API of one customer",
                             description="Issue an API key for /v1/customers/CUSTOMER/… (Authorization: Bearer "
                                         "<key>). It is printed once; the hub keeps only its hash.")
    api_key.add_argument("customer", help="the customer's id")

    gateways = sub.add_parser("gateways", help="list the enrolled gateways",
                              description="List the enrolled gateways: id, customer, name, state, last seen, "
                                          "acknowledged sequence, active keys.")
    gateways.add_argument("--json", action="store_true", help="print one JSON document")

    revoke = sub.add_parser("revoke", help="revoke a gateway: refused at its next connect, live session ended",
                            description="Revoke a gateway. It is refused from its next connection on; a running "
                                        "hub also ends its live session within a few seconds. To let it back, "
                                        "enroll it again with a new token.")
    revoke.add_argument("gateway", help="the gateway's id (see `gateway hub gateways`)")

    for p in (serve, add, clist, token, api_key, gateways, revoke):
        p.add_argument("--data", type=Path, metavar="DIR", default=None,
                       help=f"the hub's data directory (default: ${DATA_ENV})")
        p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                       help="log format on stderr: console on a terminal, JSON otherwise (default: %(default)s)")
        p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                       default="info" if p is serve else "warning", help="log level (default: %(default)s)")
    return parser


def run_cli(args: argparse.Namespace, *, env: Mapping[str, str] = os.environ, stdout: TextIO | None = None,
            stderr: TextIO | None = None) -> int:
    """Run a parsed ``hub`` command: 0 on success, 2 on an error (printed with its remedy)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        data = _data_dir(args, env)
        command = args.hub_command
        if command == "serve":
            return _serve(args, data, env, err)
        if command == "customer" and args.customer_command == "add":
            with _store(data, create=True) as store:
                c = store.add_customer(args.id, args.name)
            print(f"added customer {c.id} ({c.name}); issue an enrollment token for its gateway with "
                  f"`gateway hub token {c.id}`", file=out)
            return 0
        with _store(data) as store:
            if command == "customer":
                for c in store.customers():
                    print(f"{c.id}\t{c.name}\t{c.created_at}\tevents={c.last_seq}", file=out)
                return 0
            if command == "token":
                value, expires = store.issue_token(args.customer, args.ttl)
                print(value, file=out)
                print(f"single-use enrollment token for {args.customer}, valid until {expires}. On the gateway:\n"
                      "  gateway enroll --hub https://THIS-HUB --token TOKEN      (TOKEN: the line on standard output)",
                      file=err)
                return 0
            if command == "api-key":
                print(store.issue_api_key(args.customer), file=out)
                print(f"API key for {args.customer} (shown once; the hub keeps only its hash). Use it as "
                      "'Authorization: Bearer <key>' on /v1/customers/" + args.customer + "/…", file=err)
                return 0
            if command == "gateways":
                _print_gateways(store, out, as_json=args.json)
                return 0
            if command == "revoke":
                at = store.revoke(args.gateway)
                print(f"revoked {args.gateway} (at {at}); it is refused from its next connection on, and a running "
                      "hub ends its live session within a few seconds", file=out)
                return 0
        raise ConfigError(f"unknown hub command {command!r}")
    except GatewayError as e:
        print(f"error: {e}", file=err)
        return 2
    except KeyboardInterrupt:
        return 130


def _data_dir(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    if args.data is not None:
        return Path(args.data)
    if env.get(DATA_ENV):
        return Path(env[DATA_ENV])
    raise ConfigError("no data directory given", key="hub_data_missing",
                      remedy=f"pass --data DIR (the hub's data directory), or set {DATA_ENV}")


class _store:
    """Open the hub's database for one command; refuse to invent one except for ``customer add``."""

    def __init__(self, data: Path, *, create: bool = False) -> None:
        if not create and not (data / DB_NAME).exists():
            raise ConfigError(f"there is no hub database in {data}", key="hub_data_missing",
                              remedy="check --data (it is the directory `gateway hub serve --data` uses); a new "
                                     "hub starts with `gateway hub customer add ID --data DIR`")
        self.store = HubStore.in_dir(data)

    def __enter__(self) -> HubStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _print_gateways(store: HubStore, out: TextIO, *, as_json: bool) -> None:
    records = store.gateways()
    if as_json:
        print(json.dumps({"gateways": [g.to_json() for g in records]}, indent=2), file=out)
        return
    print("ID\tCUSTOMER\tNAME\tSTATE\tLAST_SEEN\tACKED_SEQ\tKEYS", file=out)
    for g in records:
        state = f"revoked {g.revoked_at}" if g.revoked_at else "active"
        keys = ",".join(k.key_id for k in g.keys if not k.retired)
        print(f"{g.id}\t{g.customer}\t{g.name}\t{state}\t{g.last_seen_at or 'never'}\t{g.last_seq}\t{keys}", file=out)


def _serve(args: argparse.Namespace, data: Path, env: Mapping[str, str], err: TextIO) -> int:
    from gateway.hub.server import HubSettings, RunningHub, run_hub

    var = args.admin_token_env or ADMIN_TOKEN_ENV
    value = env.get(var)
    if args.admin_token_env and not value:
        raise ConfigError(f"--admin-token-env names {var}, which is not set", key="admin_token_missing",
                          remedy=f"export {var}=$(openssl rand -base64 32), or leave --admin-token-env out to run "
                                 "without the admin API")
    host, port = args.listen
    settings = HubSettings(data_dir=data, host=host, port=port, cert_file=args.cert, key_file=args.key,
                           insecure_http=args.insecure_http, admin_token=Secret(value) if value else None,
                           public_url=args.public_url, command_timeout=args.command_timeout,
                           webhook_ca_file=args.webhook_ca, synchronous=args.synchronous,
                           retention_days=args.retention_days, graph_rate=args.graph_rate,
                           graph_burst=args.graph_burst)
    settings.validate()

    def ready(running: RunningHub) -> None:
        print(f"hub listening on {running.url} (tunnel: {running.url.replace('http', 'ws', 1)}/v1/tunnel); "
              f"data in {data.resolve()}" + ("" if value else f"; admin API off (set {var} to turn it on)"),
              file=err)

    return asyncio.run(run_hub(settings, ready=ready))

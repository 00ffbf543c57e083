"""Measure the people sync against a real Active Directory (Samba AD DC, as the test suite starts it): N people seeded
by LDIF, then a first (full) sync into a SQLite store, an incremental sync with nothing changed, and one after 100
people changed. Prints the wall time and the LDAP requests (binds, StartTLS, search pages) of each.

    sudo .venv/bin/python scripts/bench_directory.py --people 10000 [--json]

Needs root and the packages in packaging/test-packages.txt (like the LDAP tests). Seeding 10,000 people by LDIF
takes minutes (ldb rewrites its index records with every entry): the seeded DC is cached per machine, like the
tests' provisioned one, so only the first run pays for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldap3

from gateway.directory.ldap import LdapDirectory, LdapSettings
from gateway.store.sqlite import SqliteStore
from gateway.sync.people import PeopleSync
from tests import ldap_server as ad


def people_ldif(ou: str, n: int) -> str:
    out = [f"dn: {ou}\nobjectClass: organizationalUnit\n\n"]
    for i in range(n):
        out.append(ad.user_ldif(f"Bench Person {i:05d}", ou, sam=f"bench{i:05d}", mail=f"bench{i:05d}@{ad.MAIL}",
                                password=None, msExchRecipientTypeDetails=1, department=f"Dept {i % 40}",
                                givenName="Bench", sn=f"Person {i:05d}"))
    return "".join(out)


async def measure(dc: ad.SambaDC, ou: str, n: int, folder: Path) -> dict[str, Any]:
    settings = LdapSettings(urls=(dc.ldaps_url,), bind=ad.BIND_DN, base_dn=ad.BASE, ca_file=str(dc.ca),
                            server_name=ad.SERVER_NAME, people_base=ou)
    d = LdapDirectory(settings, ad.PASSWORD)
    store = SqliteStore(folder / "gateway.sqlite")
    sync = PeopleSync(d, store, directory="bench")
    results: dict[str, Any] = {"people": n, "page_size": settings.page_size}
    try:
        async def step(name: str, **kw: Any) -> None:
            before, started = d.requests, time.perf_counter()
            counts = await sync.sync(**kw)
            results[name] = {"seconds": round(time.perf_counter() - started, 3), "ldap_requests": d.requests - before,
                             "events": counts}
        await step("full_sync")
        await step("incremental_nothing_changed")
        conn = dc.connect()
        try:
            for i in range(0, n, max(1, n // 100)):
                conn.modify(f"CN=Bench Person {i:05d},{ou}", {"department": [(ldap3.MODIFY_REPLACE, ["Moved"])]})
        finally:
            conn.unbind()
        await step("incremental_100_changed")
        await step("full_compare_nothing_changed", full=True)
        results["outbox_events"] = store.last_seq()
    finally:
        store.close()
        await d.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=10000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    why = ad.unavailable()
    if why:
        print(f"cannot run Active Directory here: {why}", file=sys.stderr)
        return 2
    ou = f"OU=Bench,{ad.BASE}"
    with tempfile.TemporaryDirectory() as tmp:
        seeded = time.perf_counter()
        folder = ad.seeded(f"bench-{args.people}", lambda: people_ldif(ou, args.people))
        with ad.samba_dc(Path(tmp), source=folder) as dc:
            started = round(time.perf_counter() - seeded, 1)
            results = asyncio.run(measure(dc, ou, args.people, Path(tmp)))
            results["seed_and_start_seconds"] = started
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{results['people']} people (seeded by LDIF, cached per machine; DC ready in "
              f"{results['seed_and_start_seconds']} s), page size {results['page_size']}")
        for name in ("full_sync", "incremental_nothing_changed", "incremental_100_changed",
                     "full_compare_nothing_changed"):
            r = results[name]
            print(f"  {name:<30} {r['seconds']:>8.3f} s  {r['ldap_requests']:>4} LDAP requests  events {r['events']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

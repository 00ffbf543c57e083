"""Every credential the gateway uses, and when it stops working: nothing expires or locks out silently.

What is watched (``Watched``), one check each, run at start and then every ``credentials.check_interval_seconds``:

    source:NAME (password)         a source's service account: its password expiry and lockout from the directory's
                                   AccountLookup (AD: msDS-UserPasswordExpiryTimeComputed, lockoutTime); without a
                                   directory its expiry cannot be known (known=False, said so), but a lockout Exchange
                                   reported (AccountLocked) still is
                                   (while AD says it is locked out, the source's outage gate holds its logons:
                                   each would only prolong the lockout; it is asked again every minute meanwhile)
    source:NAME (its own)          what a source's CredentialProbe says (a Graph secret's end date, a certificate's
                                   notAfter), under the labels it chooses
    directory:NAME (password)      the LDAP bind account, asked of the directory itself
    relay (relay_key)              the relay identity key: the date its rotation is due (created + rotate_after). The
                                   gateway rotates it itself while connected, so no warning comes ahead of that date;
                                   a key still unrotated a day after it is an error (the hub was not reachable)

What is told:
- ``gateway_credential_expiry_timestamp_seconds{credential,kind}``: the Unix time it stops working, only for
  expiries that are known and finite. A credential that never expires, or whose end cannot be known here, has no
  sample: ``expiry - time() < 7 * 86400`` then simply never matches (no +Inf to special-case in dashboards).
- ``gateway_credential_locked_out{credential}``: 1 while the account is locked out, 0 otherwise (every credential
  with a lock to speak of: accounts).
- A warning at each of ``warn_days`` (30, 7 and 1 days ahead), ONCE per credential, threshold and end date; an
  error once when it has expired, is locked out or disabled, each with its remedy. What was said is remembered in a
  small state file beside the store (0600), so a restart does not say it again; a new end date (the password was
  changed) starts afresh.
- ``current``/``last_known``: the latest results, for ``gateway doctor`` and ``gateway rooms`` (which reads them from
  the state file without connecting anywhere).

A check that raises is reported (``credential.check_failed``, once until it works again) and shown as not known; it
never stops the others or the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.errors import AccountLocked, GatewayError
from gateway.ports import AccountLookup, CredentialExpiry, CredentialProbe, OpenedSource, Outage
from gateway.security import permissions
from gateway.security.identity import GatewayIdentity

log = structlog.get_logger("gateway.credential_watch")

WARN_DAYS: Final = (30, 7, 1)
CHECK_SECONDS: Final = 3600.0
LOCKED_RECHECK_SECONDS: Final = 60.0  # how soon a locked-out account is asked about again
STATE_FILE: Final = "credentials.json"  # beside the store
RELAY_OVERDUE: Final = timedelta(days=1)  # an unrotated relay key is a problem this long after its rotation date
NO_DIRECTORY: Final = ("its password's expiry cannot be known without a directory (configure the LDAP directory "
                       "to read it from Active Directory)")

Check = Callable[[], Awaitable[list[CredentialExpiry]]]


@dataclass(frozen=True, slots=True)
class Watched:
    """One check: the label its failure is reported under, and the vault entry that replaces the credential
    (``gateway credentials set ENTRY``; None: not a vault entry)."""

    credential: str
    kind: str
    check: Check
    entry: str | None = None


# -- the checks --------------------------------------------------------------------------------------------------
def account_check(credential: str, username: str, lookup: AccountLookup | None, *,
                  outage: Outage | None = None) -> Check:
    """A service account's password: from the directory when there is one; a lockout Exchange reported through the
    source's outage gate is known either way."""
    async def check() -> list[CredentialExpiry]:
        locked = outage is not None and isinstance(outage.failure, AccountLocked)
        if lookup is None:
            return [CredentialExpiry(credential, "password", None, known=False, locked_out=locked,
                                     detail=f"{username}: {NO_DIRECTORY}")]
        status = await lookup.account(username)
        if outage is not None:
            _tell_gate(outage, username, status.locked_out)
        return [CredentialExpiry(credential, "password", status.password_expires_at,
                                 locked_out=status.locked_out or locked, detail=username, disabled=status.disabled)]
    return check


def _tell_gate(outage: Outage, username: str, locked_out: bool) -> None:
    """The directory's word on a lockout, to the source's outage gate: hold its logons while AD says the account is
    locked out (each would only prolong it), let it probe once AD says it is not."""
    if locked_out:
        hold = getattr(outage, "hold", None)
        if hold is not None:
            hold(AccountLocked(f"Active Directory says the service account {username} is locked out",
                               remedy="the gateway makes no logon until Active Directory says it is unlocked; "
                                      "unlock it there (Unlock-ADAccount) and check where a wrong password came from"))
    elif isinstance(outage.failure, AccountLocked):
        release = getattr(outage, "release", None)
        if release is not None:
            release()


async def hold_locked_accounts(lookup: AccountLookup, accounts: Sequence[tuple[str, Outage]], *,
                               timeout: float = 10.0) -> None:
    """Before a source's first logon (at start): each (username, outage gate) whose account the directory says is
    locked out is held at once, not after a logon the credential watch's first check would come too late to stop. A
    directory that cannot answer (within ``timeout``: a start is not held up by a DC that is down) holds nothing;
    the watch asks again."""
    for username, outage in accounts:
        try:
            status = await asyncio.wait_for(lookup.account(username), timeout)
        except (GatewayError, TimeoutError) as e:
            log.info("credential.lockout_unknown", account=username, error=getattr(e, "key", "timeout"))
            continue
        _tell_gate(outage, username, status.locked_out)


def source_accounts(sources: Sequence[tuple[object, OpenedSource]]) -> list[tuple[str, Outage]]:
    """(username, outage gate) of every source (its settings and what its kind opened) that logs on with one."""
    found = []
    for settings, opened in sources:
        username = getattr(settings, "username", None)
        if isinstance(username, str) and username and opened.outage is not None:
            found.append((username, opened.outage))
    return found


def probe_check(probe: CredentialProbe) -> Check:
    """What a source knows of its own credentials (a Graph secret or certificate)."""
    return probe.credential_expiry


def relay_check(identity: GatewayIdentity, rotate_after: timedelta | None) -> Check:
    """The relay identity key: the date its rotation is due (it is re-read, so a rotation is seen)."""
    async def check() -> list[CredentialExpiry]:
        with contextlib.suppress(GatewayError):
            await asyncio.to_thread(identity.reload)
        if rotate_after is None:
            return [CredentialExpiry("relay", "relay_key", None, detail=f"key {identity.key_id}, not rotated")]
        due = identity.key_created_at + rotate_after
        return [CredentialExpiry("relay", "relay_key", due, detail=f"key {identity.key_id}")]
    return check


def source_watched(name: str, settings: object, opened: OpenedSource, accounts: AccountLookup | None,
                   entry: str | None) -> list[Watched]:
    """A source's credentials: its service account, when its kind logs on with a user name (``settings.username``),
    and what the source itself knows of its own (its CredentialProbe)."""
    label = f"source:{name}"
    watched = []
    username = getattr(settings, "username", None)
    if isinstance(username, str) and username:
        watched.append(Watched(label, "password", account_check(label, username, accounts, outage=opened.outage),
                               entry))
    if opened.credentials is not None:
        watched.append(Watched(label, "secret", probe_check(opened.credentials), entry))
    return watched


# -- remedies ----------------------------------------------------------------------------------------------------
def remedy(expiry: CredentialExpiry, entry: str | None, problem: str) -> str:
    """What to do, for a credential of this kind that will expire, has expired (``expired``), is locked out
    (``locked_out``) or disabled (``disabled``)."""
    store = f"`gateway credentials set {entry or 'NAME'}` (the running gateway picks it up, no restart)"
    if expiry.kind == "password":
        if problem == "locked_out":
            return ("ask an Active Directory administrator to unlock the service account (Unlock-ADAccount -Identity "
                    f"ACCOUNT) once the gateway has the right password: store it with {store}")
        if problem == "disabled":
            return "ask an Active Directory administrator to enable the service account again"
        return (f"set a new password for the service account in Active Directory and store it with {store}; do not "
                "make it never expire")
    if expiry.kind in ("client_secret", "certificate"):
        what = "client secret" if expiry.kind == "client_secret" else "certificate (upload its public part)"
        return f"add a new {what} to the app registration in Microsoft Entra ID and store it with {store}"
    if expiry.kind == "relay_key":
        return ("the gateway rotates its relay key itself while the tunnel is up; it could not: check the tunnel "
                "(`gateway doctor`), or rotate now with `gateway rotate-key`")
    return f"replace it and store the new one with {store}"


# -- the watch ---------------------------------------------------------------------------------------------------
def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def _parse(text: Any) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None


def days_left(expiry: CredentialExpiry, now: datetime) -> float | None:
    if not expiry.known or expiry.expires_at is None:
        return None
    return (expiry.expires_at - now).total_seconds() / 86400


def problem_of(expiry: CredentialExpiry, now: datetime) -> str:
    """``locked_out``, ``disabled``, ``expired`` (for the relay key: rotation overdue), or empty."""
    if expiry.locked_out:
        return "locked_out"
    if expiry.disabled:
        return "disabled"
    if expiry.known and expiry.expires_at is not None:
        grace = RELAY_OVERDUE if expiry.kind == "relay_key" else timedelta(0)
        if now >= expiry.expires_at + grace:
            return "expired"
    return ""


def describe(expiry: CredentialExpiry, now: datetime, warn_days: Sequence[int] = WARN_DAYS) -> tuple[str, str]:
    """(mark, text) for one credential, as doctor and ``gateway rooms`` show it: ok, warn or FAIL."""
    problem = problem_of(expiry, now)
    left = days_left(expiry, now)
    if not expiry.known:
        text = f"expiry not known: {expiry.detail}" if expiry.detail else "expiry not known"
    elif expiry.expires_at is None:
        text = "never expires"
    elif left is not None and left < 0:
        text = f"expired {_iso(expiry.expires_at)}"
    else:
        text = f"expires {_iso(expiry.expires_at)} (in {left:.1f} days)"
    if expiry.kind == "relay_key" and expiry.expires_at is not None and not problem:
        text = text.replace("expires", "rotation due").replace("expired", "rotation due since")
    if problem:
        label = {"locked_out": "LOCKED OUT", "disabled": "DISABLED"}.get(problem, "")
        return "FAIL", f"{label}; {text}" if label else text
    soon = left is not None and expiry.kind != "relay_key" and warn_days and left <= max(warn_days)
    return ("warn" if soon else "ok"), text


async def check_all(watched: Sequence[Watched]) -> list[tuple[Watched, list[CredentialExpiry], str | None]]:
    """Each check's results, and why it failed (None: it did not); a check that raises is shown as not known."""
    out: list[tuple[Watched, list[CredentialExpiry], str | None]] = []
    for w in watched:
        try:
            out.append((w, await w.check(), None))
        except Exception as e:  # a check that fails says so; it never stops the others
            reason = str(e) if isinstance(e, GatewayError) else f"{type(e).__name__}: {e}"
            out.append((w, [CredentialExpiry(w.credential, w.kind, None, known=False,
                                             detail=f"could not be checked: {reason}")], reason))
    return out


class CredentialWatch:
    """Runs the checks, keeps their latest results, tells each warning once (see the module's docstring)."""

    def __init__(self, watched: Sequence[Watched], *, state_path: Path | None, warn_days: Sequence[int] = WARN_DAYS,
                 clock: Callable[[], datetime] | None = None,
                 locked_recheck_seconds: float = LOCKED_RECHECK_SECONDS) -> None:
        self.watched = list(watched)
        self.locked_recheck_seconds = locked_recheck_seconds
        self.state_path = state_path
        self.warn_days = tuple(sorted(set(warn_days), reverse=True))
        self.clock = clock or (lambda: datetime.now(UTC))
        self.current: list[CredentialExpiry] = []
        self.entries: dict[str, str | None] = {}  # credential -> vault entry, for remedies
        self.checked_at: datetime | None = None
        self._failing: set[str] = set()  # checks whose failure was logged (until they work again)
        self._wake = asyncio.Event()
        state = read_state(state_path)
        self._said: set[str] = set(state.get("said", []))

    async def check(self) -> list[CredentialExpiry]:
        """Every check once; the results, each warning or error logged once, the state file updated."""
        results: list[CredentialExpiry] = []
        for w, found, reason in await check_all(self.watched):
            if reason is not None:
                if w.credential not in self._failing:
                    self._failing.add(w.credential)
                    log.warning("credential.check_failed", credential=w.credential, kind=w.kind, error=reason)
            elif w.credential in self._failing:
                self._failing.discard(w.credential)
                log.info("credential.check_recovered", credential=w.credential)
            for expiry in found:
                self.entries[expiry.credential] = w.entry
            results.extend(found)
        now = self.clock()
        for expiry in results:
            self._tell(expiry, now)
        self.current, self.checked_at = results, now
        self._save()
        return results

    def wake(self) -> None:
        """Check now (a source's outage started or ended: a lockout Exchange reports is told at once, not within
        the hour). On the event loop's thread."""
        self._wake.set()

    async def run(self, every: float) -> None:
        """Check now and then every ``every`` seconds (or when woken), until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.check()
            except Exception as e:  # a bug here must not end the watch: the next check may well work
                log.error("credential.watch_failed", error=f"{type(e).__name__}: {e}")
            # While an account is locked out, its end is looked for soon: the source holds its logons until then.
            wait = min(every, self.locked_recheck_seconds) if any(e.locked_out for e in self.current) else every
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _tell(self, expiry: CredentialExpiry, now: datetime) -> None:
        name, entry = expiry.credential, self.entries.get(expiry.credential)
        problem = problem_of(expiry, now)
        for kind in ("locked_out", "disabled"):  # a lock lifted is forgotten, so the next one is told again
            if problem != kind:
                self._said.discard(f"{name}|{kind}")
        if problem in ("locked_out", "disabled"):
            if self._once(f"{name}|{problem}"):
                log.error(f"credential.{problem}", credential=name, kind=expiry.kind, detail=expiry.detail,
                          remedy=remedy(expiry, entry, problem))
            return
        left = days_left(expiry, now)
        if left is None:
            return
        end = _iso(expiry.expires_at)
        if problem == "expired":
            if self._once(f"{name}|{end}|expired"):
                log.error("credential.expired", credential=name, kind=expiry.kind, expired_at=end,
                          remedy=remedy(expiry, entry, problem))
            return
        if expiry.kind == "relay_key":  # rotated by the gateway itself on the day: nothing to warn about before
            return
        due = [d for d in self.warn_days if left <= d]
        if not due:
            return
        # Only the nearest threshold is told; the ones farther out count as told (a start 5 days ahead says 7, once).
        fresh = [d for d in due if self._once(f"{name}|{end}|{d}")]
        if due[-1] in fresh:
            log.warning("credential.expires_soon", credential=name, kind=expiry.kind, expires_at=end,
                        days_left=round(left, 1), threshold_days=due[-1], remedy=remedy(expiry, entry, "expires"))

    def _once(self, key: str) -> bool:
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def _save(self) -> None:
        # What was told about an end date a credential no longer has (its password was changed) is forgotten; a
        # credential that could not be checked this time keeps what was told.
        ends = {e.credential: f"{e.credential}|{_iso(e.expires_at)}|" for e in self.current
                if e.known and e.expires_at is not None}
        self._said = {k for k in self._said
                      if k.count("|") == 1 or k.split("|")[0] not in ends or k.startswith(ends[k.split("|")[0]])}
        if self.state_path is None:
            return
        state = {"said": sorted(self._said), "checked_at": _iso(self.checked_at),
                 "credentials": [{"credential": e.credential, "kind": e.kind, "expires_at": _iso(e.expires_at),
                                  "known": e.known, "locked_out": e.locked_out, "disabled": e.disabled,
                                  "detail": e.detail,
                                  "entry": self.entries.get(e.credential)} for e in self.current]}
        try:
            write_state(self.state_path, state)
        except OSError as e:  # the warnings would be told again after a restart; nothing worse
            log.warning("credential.state_unwritable", path=str(self.state_path), error=str(e))

    def collector(self) -> Collector:
        return _ExpiryCollector(self)


class _ExpiryCollector(Collector):
    def __init__(self, watch: CredentialWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterator[Any]:
        expiry = GaugeMetricFamily("gateway_credential_expiry_timestamp_seconds",
                                   "When a credential stops working (Unix time); absent when it never expires or "
                                   "cannot be known", labels=["credential", "kind"])
        locked = GaugeMetricFamily("gateway_credential_locked_out", "1 while the account is locked out",
                                   labels=["credential"])
        for e in self.watch.current:
            if e.known and e.expires_at is not None:
                expiry.add_metric([e.credential, e.kind], e.expires_at.timestamp())
            if e.kind == "password":
                locked.add_metric([e.credential], 1.0 if e.locked_out else 0.0)
        yield expiry
        yield locked


# -- the state file ----------------------------------------------------------------------------------------------
def state_path_for(store_path: Path) -> Path:
    return Path(store_path).parent / STATE_FILE


def read_state(path: Path | None) -> dict[str, Any]:
    """The state file's content; empty when there is none or it cannot be read (warnings are then told again)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def last_known(path: Path) -> tuple[datetime | None, list[tuple[CredentialExpiry, str | None]]]:
    """(when, each credential and its vault entry) as the running gateway last checked them."""
    state = read_state(path)
    found = []
    for item in state.get("credentials", []):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            found.append((CredentialExpiry(str(item["credential"]), str(item["kind"]), _parse(item["expires_at"]),
                                           known=bool(item["known"]), locked_out=bool(item["locked_out"]),
                                           detail=str(item["detail"]), disabled=bool(item.get("disabled"))),
                          item.get("entry")))
    return _parse(state.get("checked_at")), found


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically, mode 0600, in a 0700 folder."""
    permissions.make_private_dir(path.parent, setting="store.path")
    with permissions.private_umask():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

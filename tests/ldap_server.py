"""A real Active Directory for the LDAP tests: Samba's AD DC, provisioned once per machine and copied per session,
run in its own network namespace and reached on 127.0.0.1 through socat forwarders (its ports cannot be changed).
See ../shared/docs/directory-server.md for why each step is what it is.

Provisioning takes many seconds on a loaded machine, so the provisioned folder (schema extended with Exchange's
attributes, the standard organisation seeded) is cached under ~/.cache/exchange-room-gateway/ keyed by VERSION,
built under a file lock. A session copies it, adds what it needs offline (``extra_ldif``), then starts it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

VERSION = "samba-ad-5"  # change when the provisioning or the standard organisation below changes
REALM = "CORP.EXAMPLE.TEST"
DOMAIN = "CORP"
BASE = "DC=corp,DC=example,DC=test"
MAIL = "corp.example.test"
SERVER_NAME = "dc1.corp.example.test"  # CN of the DC's self-signed certificate (no SAN, no IP)
ADMIN_PASSWORD = "Adm1n-Pass!x"
PASSWORD = "Secret-Pass-1!"  # every seeded account's password
PROVISION_BIN = ("samba", "samba-tool", "ldbadd", "ldbmodify", "socat", "ip")
ROOM_LIST_TYPE = 268435456  # msExchRecipientTypeDetails of a room list (a distribution group)

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "exchange-room-gateway"


def unavailable() -> str | None:
    """Why this machine cannot run the DC (None: it can)."""
    if os.geteuid() != 0:
        return "Samba's AD DC must run as root (its LDAP ports are fixed and need their own network namespace)"
    missing = [b for b in PROVISION_BIN if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"missing {', '.join(missing)}: install the packages in packaging/test-packages.txt "
                "(scripts/test.sh does)")
    probe = f"gwprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create a network namespace (`ip netns add` refused: a container without CAP_SYS_ADMIN?)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def password_ldif(password: str) -> str:
    return base64.b64encode(f'"{password}"'.encode("utf-16-le")).decode()


def user_ldif(cn: str, ou: str, *, sam: str, mail: str | None = None, uac: int = 512, password: str | None = PASSWORD,
              **attrs: str | int | list[str]) -> str:
    """One user object; extra attributes as keyword arguments (a list gives several values)."""
    lines = [f"dn: CN={cn},{ou}", "objectClass: user", f"sAMAccountName: {sam}", f"userPrincipalName: {sam}@{MAIL}",
             f"userAccountControl: {uac}", f"displayName: {cn}"]
    if mail:
        lines.append(f"mail: {mail}")
    if password:
        lines.append(f"unicodePwd:: {password_ldif(password)}")
    for name, value in attrs.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{name}: {v}")
    return "\n".join(lines) + "\n\n"


def person_ldif(sam: str, ou: str, *, name: str | None = None, uac: int = 512, **attrs: str | int | list[str]) -> str:
    """A person with a user mailbox (msExchRecipientTypeDetails 1)."""
    cn = name or sam.title()
    given, _, surname = cn.partition(" ")
    names: dict[str, str | int | list[str]] = {"givenName": given, **({"sn": surname} if surname else {})}
    return user_ldif(cn, ou, sam=sam, mail=f"{sam}@{MAIL}", uac=uac, msExchRecipientTypeDetails=1, **names, **attrs)


def room_ldif(sam: str, ou: str, *, name: str, capacity: int | None = None, location: str | None = None,
              kind: int = 16) -> str:
    """A room (16) or equipment (32) mailbox: a disabled user, as Exchange makes them."""
    attrs: dict[str, str | int | list[str]] = {"msExchRecipientTypeDetails": kind}
    if capacity is not None:
        attrs["msExchResourceCapacity"] = capacity
    if location:
        attrs["physicalDeliveryOfficeName"] = location
    return user_ldif(name, ou, sam=sam, mail=f"{sam}@{MAIL}", uac=514, password=None, **attrs)


def group_ldif(cn: str, ou: str, members: list[str], *, mail: str | None = None, room_list: bool = False) -> str:
    lines = [f"dn: CN={cn},{ou}", "objectClass: group", f"sAMAccountName: {cn.replace(' ', '-').lower()}"]
    if mail:
        lines.append(f"mail: {mail}")
    if room_list:
        lines.append(f"msExchRecipientTypeDetails: {ROOM_LIST_TYPE}")
    lines += [f"member: {m}" for m in members]
    return "\n".join(lines) + "\n\n"


PEOPLE_OU = f"OU=People,{BASE}"
ROOMS_OU = f"OU=Rooms,{BASE}"
SERVICE_OU = f"OU=Service,{BASE}"
GROUPS_OU = f"OU=Groups,{BASE}"
BIND_DN = f"CN=svc-ldap,{SERVICE_OU}"  # the gateway's bind account (password never expires)
EXPIRING = "svc-exchange"  # a service account under a 5-day password policy (reset per session: expires soon)
LOCKABLE = "svc-lockable"  # a service account under a policy that locks it after 3 bad passwords
NEVER = "svc-never"


def _schema_ldif() -> tuple[str, str]:
    schema = f"CN=Schema,CN=Configuration,{BASE}"
    attrs = [("ms-Exch-Recipient-Type-Details", "1.2.840.113556.1.4.7000.102.50855", "2.5.5.16", 65,
              "msExchRecipientTypeDetails"),
             ("ms-Exch-Recipient-Display-Type", "1.2.840.113556.1.4.7000.102.50730", "2.5.5.9", 2,
              "msExchRecipientDisplayType"),
             ("ms-Exch-Resource-Capacity", "1.2.840.113556.1.4.7000.102.50969", "2.5.5.9", 2,
              "msExchResourceCapacity")]
    add = "".join(f"dn: CN={cn},{schema}\nobjectClass: top\nobjectClass: attributeSchema\ncn: {cn}\n"
                  f"attributeID: {oid}\nattributeSyntax: {syntax}\noMSyntax: {om}\nisSingleValued: TRUE\n"
                  f"lDAPDisplayName: {name}\nsystemOnly: FALSE\n\n" for cn, oid, syntax, om, name in attrs)
    modify = (f"dn: CN=Mail-Recipient,{schema}\nchangetype: modify\nadd: mayContain\n"
              + "".join(f"mayContain: {a[4]}\n" for a in attrs))
    return add, modify


def _pso(cn: str, applies_to: str, *, max_age_days: int = 0, lockout_threshold: int = 0) -> str:
    day = 864_000_000_000  # 100 ns intervals; AD keeps intervals negative
    return (f"dn: CN={cn},CN=Password Settings Container,CN=System,{BASE}\nobjectClass: msDS-PasswordSettings\n"
            "msDS-PasswordSettingsPrecedence: 1\nmsDS-PasswordReversibleEncryptionEnabled: FALSE\n"
            "msDS-PasswordHistoryLength: 0\nmsDS-PasswordComplexityEnabled: FALSE\nmsDS-MinimumPasswordLength: 0\n"
            f"msDS-MinimumPasswordAge: 0\nmsDS-MaximumPasswordAge: {-(max_age_days or 42) * day}\n"
            f"msDS-LockoutThreshold: {lockout_threshold}\nmsDS-LockoutObservationWindow: -18000000000\n"
            f"msDS-LockoutDuration: -18000000000\nmsDS-PSOAppliesTo: {applies_to}\n\n")


def standard_org() -> tuple[str, str]:
    """The organisation every session starts with: people (one disabled, one without a mailbox), rooms in a room
    list, an equipment mailbox, nested groups, and the service accounts."""
    ous = "".join(f"dn: {ou}\nobjectClass: organizationalUnit\n\n" for ou in (PEOPLE_OU, ROOMS_OU, SERVICE_OU,
                                                                              GROUPS_OU))
    people = (person_ldif("alice", PEOPLE_OU, name="Alice Anders", department="Sales")
              + person_ldif("bob", PEOPLE_OU, name="Bob Berg", department="Sales",
                            manager=f"CN=Alice Anders,{PEOPLE_OU}")
              + person_ldif("carol", PEOPLE_OU, name="Carol Cole", department="Finance", uac=514)
              + user_ldif("Dave NoMail", PEOPLE_OU, sam="dave"))
    rooms = (room_ldif("room1", ROOMS_OU, name="HQ Room 1", capacity=8, location="HQ, floor 1")
             + room_ldif("room2", ROOMS_OU, name="HQ Room 2", capacity=4, location="HQ, floor 2")
             + room_ldif("room3", ROOMS_OU, name="Annex Room 3", capacity=12)
             + room_ldif("beamer1", ROOMS_OU, name="Beamer 1", kind=32))
    groups = (group_ldif("Rooms HQ", GROUPS_OU, [f"CN=HQ Room 1,{ROOMS_OU}", f"CN=HQ Room 2,{ROOMS_OU}"],
                         mail=f"rooms-hq@{MAIL}", room_list=True)
              + group_ldif("Sales", GROUPS_OU, [f"CN=Alice Anders,{PEOPLE_OU}"])
              + group_ldif("Staff", GROUPS_OU, [f"CN=Sales,{GROUPS_OU}", f"CN=Carol Cole,{PEOPLE_OU}"]))
    service = (user_ldif("svc-ldap", SERVICE_OU, sam="svc-ldap", uac=66048)
               + user_ldif(NEVER, SERVICE_OU, sam=NEVER, uac=66048)
               + user_ldif(EXPIRING, SERVICE_OU, sam=EXPIRING)
               + user_ldif(LOCKABLE, SERVICE_OU, sam=LOCKABLE, uac=66048))
    psos = (_pso("Short passwords", f"CN={EXPIRING},{SERVICE_OU}", max_age_days=5)
            + _pso("Lock soon", f"CN={LOCKABLE},{SERVICE_OU}", lockout_threshold=3))
    # The domain counts bad passwords only with a lockout threshold (a hardened domain has one).
    domain = f"dn: {BASE}\nchangetype: modify\nreplace: lockoutThreshold\nlockoutThreshold: 50\n\n"
    return ous + people + rooms + groups + service + psos, domain


def _run(cmd: list[str], what: str, **kw: object) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")


def _ldb(tool: str, folder: Path, ldif: str, *extra: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".ldif", dir=folder, delete=False) as f:
        f.write(ldif)
    try:
        _run([tool, "-H", str(folder / "private" / "sam.ldb"), *extra, f.name], f"{tool} into {folder}")
    finally:
        os.unlink(f.name)


def provisioned() -> Path:
    """The provisioned, seeded DC folder for this machine (built once, under a lock)."""
    target = CACHE / VERSION
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "ready").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="samba-prov-", dir=CACHE))
        _run(["samba-tool", "domain", "provision", "--realm", REALM, "--domain", DOMAIN, "--server-role", "dc",
              "--dns-backend", "NONE", "--host-name", "dc1", "--adminpass", ADMIN_PASSWORD,
              "--targetdir", str(work / "dc"),
              "--option=interfaces=lo", "--option=bind interfaces only=yes"], "samba-tool domain provision")
        add, modify = _schema_ldif()
        _ldb("ldbadd", work / "dc", add, "--option=dsdb:schema update allowed=true")
        _ldb("ldbmodify", work / "dc", modify, "--option=dsdb:schema update allowed=true")
        entries, domain = standard_org()
        _ldb("ldbadd", work / "dc", entries)
        _ldb("ldbmodify", work / "dc", domain)
        (work / "dc" / "provisioned-at").write_text(str(work / "dc"))
        _smb_conf(work / "dc", str(work / "dc"))
        with _started(work / "dc"):  # once, so that the TLS key it generates at its first start is cached too
            pass
        (work / "dc" / "provisioned-at").write_text(str(work / "dc"))
        (work / "dc" / "ready").write_text(VERSION)
        work.joinpath("dc").rename(target)
        shutil.rmtree(work, ignore_errors=True)
        return target


def seeded(name: str, ldif: Callable[[], str]) -> Path:
    """The cached provision with ``ldif`` added, cached itself under ``name`` (seeding thousands of entries takes
    minutes: ldb rewrites its index records with every entry)."""
    base = provisioned()
    target = CACHE / f"{VERSION}-{name}"
    with open(CACHE / f"{VERSION}-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "seeded").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="samba-seed-", dir=CACHE)) / "dc"
        shutil.copytree(base, work, symlinks=True, ignore=_runtime_files)
        _ldb("ldbadd", work, ldif())
        (work / "seeded").write_text(name)
        work.rename(target)
        shutil.rmtree(work.parent, ignore_errors=True)
        return target


@dataclass
class Forwarder:
    port: int
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop listening and cut every connection it carries (its forked children): the DC is gone for clients."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SambaDC:
    """A running DC: ``ldap_url`` (StartTLS or plain), ``ldaps_url``; ``ca`` is its certificate authority's file."""

    folder: Path
    netns: str
    proc: subprocess.Popen[bytes]
    forwarders: list[Forwarder] = field(default_factory=list)
    ldap_port: int = 0
    ldaps_port: int = 0

    @property
    def ca(self) -> Path:
        return self.folder / "private" / "tls" / "ca.pem"

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def forward(self, inner: int) -> Forwarder:
        """One more loopback port that reaches the DC's ``inner`` port (kill it to take that "DC" down)."""
        port = _free_port()
        proc = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
             f"EXEC:ip netns exec {self.netns} socat STDIO TCP\\:127.0.0.1\\:{inner}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        fwd = Forwarder(port, proc)
        self.forwarders.append(fwd)
        deadline = time.monotonic() + 10
        while True:  # listening?
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return fwd
            if time.monotonic() > deadline:
                raise RuntimeError(f"socat forwarder on port {port} did not start")
            time.sleep(0.05)

    def admin(self) -> tuple[str, str]:
        return f"CN=Administrator,CN=Users,{BASE}", ADMIN_PASSWORD

    def connect(self, user: str | None = None, password: str | None = None) -> Any:
        """An ldap3 connection over LDAPS, bound as ``user`` (default: the domain's Administrator), for a test to
        change the directory with."""
        import ldap3

        from gateway.directory.ldap import VerifiedTls

        tls = VerifiedTls(str(self.ca), SERVER_NAME)
        admin, admin_password = self.admin()
        conn = ldap3.Connection(ldap3.Server(self.ldaps_url, use_ssl=True, tls=tls, connect_timeout=5),
                                user or admin, password if user else admin_password, receive_timeout=30,
                                auto_referrals=False, raise_exceptions=True)
        try:
            conn.open()
            conn.bind()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.unbind()
            raise
        return conn

    def lock_out(self, dn: str, tries: int = 3) -> None:
        """Lock the account out as someone guessing would: ``tries`` binds with a wrong password, each refused."""
        import pytest
        from ldap3.core import exceptions as lx

        for _ in range(tries):
            with pytest.raises(lx.LDAPInvalidCredentialsResult):
                self.connect(dn, "wrong")

    def unlock(self, dn: str) -> None:
        """What an administrator's Unlock-ADAccount does: lockoutTime back to 0."""
        import ldap3

        conn = self.connect()
        try:
            conn.modify(dn, {"lockoutTime": [(ldap3.MODIFY_REPLACE, ["0"])]})
        finally:
            conn.unbind()

    def add(self, ldif_entries: str) -> None:
        """Add entries written as LDIF (the helpers above) over LDAPS: the running DC sees them at once."""
        conn = self.connect()
        try:
            for block in ldif_entries.strip().split("\n\n"):
                attrs: dict[str, list[str | bytes]] = {}
                dn = ""
                for line in block.strip().splitlines():
                    name, _, value = line.partition(": ")
                    if name == "dn":
                        dn = value
                    elif name.endswith(":"):  # name:: base64
                        attrs.setdefault(name[:-1], []).append(base64.b64decode(value.strip()))
                    else:
                        attrs.setdefault(name, []).append(value)
                classes = attrs.pop("objectClass")
                conn.add(dn, [str(c) for c in classes], attrs)
        finally:
            conn.unbind()

    def expire_soon(self, account: str = EXPIRING) -> None:
        """Set the account's password now: under its 5-day policy it expires in 5 days (a cached provision is older)."""
        conn = self.connect()
        try:
            conn.modify(f"CN={account},{SERVICE_OU}", {"pwdLastSet": [("MODIFY_REPLACE", ["0"])]})
            conn.modify(f"CN={account},{SERVICE_OU}", {"pwdLastSet": [("MODIFY_REPLACE", ["-1"])]})
        finally:
            conn.unbind()

    def stop(self) -> None:
        for fwd in self.forwarders:
            fwd.stop()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def _runtime_files(folder: str, names: list[str]) -> set[str]:
    """What a stopped DC leaves behind that a copy must not take: sockets and its message folder."""
    import stat
    return {n for n in names if n in ("msg.sock", "run") or stat.S_ISSOCK(os.lstat(os.path.join(folder, n)).st_mode)}


def _smb_conf(folder: Path, provisioned_at: str) -> None:
    conf = folder / "etc" / "smb.conf"
    text = conf.read_text().replace(provisioned_at, str(folder))
    lines = []
    for line in text.splitlines():
        key = line.strip().split("=")[0].strip()
        if key in ("server services", "log file", "pid directory", "ncalrpc dir", "winbindd socket directory",
                   "log level"):
            continue
        lines.append(line)
        if line.strip() == "[global]":
            run = folder / "run"
            lines += ["\tserver services = ldap, cldap, kdc", f"\tlog file = {folder}/log.%m",
                      f"\tpid directory = {run}", f"\tncalrpc dir = {run}/ncalrpc",
                      f"\twinbindd socket directory = {run}/winbindd", "\tlog level = 1"]
    conf.write_text("\n".join(lines) + "\n")
    (folder / "run").mkdir(exist_ok=True)


@contextlib.contextmanager
def samba_dc(tmp: Path, extra_ldif: str = "", source: Path | None = None) -> Iterator[SambaDC]:
    """A private DC for the caller, in ``tmp``: the cached provision (or ``source``, a copy of it made by
    ``seeded``) copied, ``extra_ldif`` added offline, started, and answering on loopback ports for plain/StartTLS
    (389) and LDAPS (636)."""
    source = source or provisioned()
    folder = tmp / "dc"
    shutil.copytree(source, folder, symlinks=True, ignore=_runtime_files)
    _smb_conf(folder, (source / "provisioned-at").read_text())
    if extra_ldif:
        _ldb("ldbadd", folder, extra_ldif)
    with _started(folder) as dc:
        yield dc


@contextlib.contextmanager
def _started(folder: Path) -> Iterator[SambaDC]:
    netns = f"gwdc{uuid.uuid4().hex[:10]}"
    _run(["ip", "netns", "add", netns], "ip netns add")
    _run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], "bringing up lo in the namespace")
    out = open(folder / "samba.out", "wb")  # noqa: SIM115 - the process owns it while it runs
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "samba", "-F", "--no-process-group", "-s",
                             str(folder / "etc" / "smb.conf")], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out.close()
    dc = SambaDC(folder, netns, proc)
    try:
        dc.ldap_port = dc.forward(389).port
        dc.ldaps_port = dc.forward(636).port
        _wait_ready(dc)
        yield dc
    finally:
        dc.stop()


def _wait_ready(dc: SambaDC, timeout: float = 90.0) -> None:
    """The DC answers a bind over LDAPS (the first start generates its TLS key)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if dc.proc.poll() is not None:
            raise RuntimeError(f"samba ended ({dc.proc.returncode}): {(dc.folder / 'samba.out').read_text()[-3000:]}")
        if dc.ca.exists():
            try:
                dc.connect().unbind()
                return
            except Exception as e:  # not yet: keep polling
                last = e
        time.sleep(0.2)
    raise RuntimeError(f"samba did not answer on LDAPS within {timeout} s: {last}")


@pytest.fixture(scope="session")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """One DC for the session (per xdist worker: the LDAP modules share one xdist group, so one worker)."""
    why = unavailable()
    if why:
        pytest.skip(f"no Active Directory here: {why}")
    with samba_dc(tmp_path_factory.mktemp("samba")) as dc:
        dc.expire_soon()
        yield dc


# -- OpenLDAP: where a size limit bites ------------------------------------------------------------------------
SLAPD_BASE = "dc=example,dc=test"
SLAPD_ADMIN = f"cn=admin,{SLAPD_BASE}"  # the rootdn: no limits hold for it
SLAPD_READER = f"uid=reader,{SLAPD_BASE}"  # an ordinary account: the size limit holds
SLAPD_SIZE_LIMIT = 100


@dataclass
class Slapd:
    url: str  # ldap:// (StartTLS)
    ca: Path
    proc: subprocess.Popen[bytes]
    server_name: str = "ldap.example.test"


def _tls_files(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``name`` signed by it: (ca, cert, key)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test LDAP CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=2)).add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                                                  critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)
    return paths


@contextlib.contextmanager
def slapd(tmp: Path, people: int) -> Iterator[Slapd]:
    """An OpenLDAP server (unprivileged, any port) holding ``people`` inetOrgPersons under ou=People and refusing
    to return more than SLAPD_SIZE_LIMIT entries to a search that is not paged."""
    if shutil.which("slapd") is None and not Path("/usr/sbin/slapd").exists():
        pytest.skip("no slapd: install the packages in packaging/test-packages.txt (scripts/test.sh does)")
    folder = tmp / "slapd"
    (folder / "db").mkdir(parents=True)
    ca, cert, key = _tls_files(folder, "ldap.example.test")
    conf = folder / "slapd.conf"
    conf.write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {folder}/slapd.pid
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
sizelimit size.soft={SLAPD_SIZE_LIMIT} size.hard={SLAPD_SIZE_LIMIT} size.prtotal=unlimited
database mdb
maxsize 104857600
suffix "{SLAPD_BASE}"
rootdn "{SLAPD_ADMIN}"
rootpw {PASSWORD}
directory {folder}/db
""")
    entries = [f"dn: {SLAPD_BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
               f"dn: ou=People,{SLAPD_BASE}\nobjectClass: organizationalUnit\nou: People\n",
               f"dn: {SLAPD_READER}\nobjectClass: inetOrgPerson\nuid: reader\ncn: Reader\nsn: Reader\n"
               f"userPassword: {PASSWORD}\n"]
    entries += [f"dn: uid=p{i:05d},ou=People,{SLAPD_BASE}\nobjectClass: inetOrgPerson\nuid: p{i:05d}\n"
                f"cn: Person {i}\nsn: {i}\nmail: p{i:05d}@example.test\n" for i in range(people)]
    (folder / "data.ldif").write_text("\n".join(entries))
    _run(["slapadd", "-q", "-f", str(conf), "-l", str(folder / "data.ldif")], "slapadd")
    port = _free_port()
    proc = subprocess.Popen(["slapd", "-d", "0", "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"slapd ended ({proc.returncode})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("slapd did not listen within 30 s")
            time.sleep(0.05)
        yield Slapd(f"ldap://127.0.0.1:{port}", ca, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

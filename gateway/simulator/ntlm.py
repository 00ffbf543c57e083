"""The server side of NTLM (NTLMv2 only, as Exchange 2016 with LmCompatibilityLevel 5 accepts).

pyspnego's acceptor reads passwords from a file named by an environment variable; a simulator with per-test
users needs them from memory, so this drives pyspnego's message and crypto primitives directly.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from spnego._ntlm_raw.crypto import compute_response_v2, ntowfv1, ntowfv2
from spnego._ntlm_raw.messages import (
    Authenticate,
    AvId,
    Challenge,
    FileTime,
    Negotiate,
    NegotiateFlags,
    NTClientChallengeV2,
    TargetInfo,
)

_SERVER_FLAGS = (
    NegotiateFlags.unicode
    | NegotiateFlags.request_target
    | NegotiateFlags.ntlm
    | NegotiateFlags.always_sign
    | NegotiateFlags.target_type_domain
    | NegotiateFlags.extended_session_security
    | NegotiateFlags.target_info
    | NegotiateFlags.sign
    | NegotiateFlags.seal
    | NegotiateFlags.key_128
    | NegotiateFlags.key_exch
    | NegotiateFlags.key_56
)


class NtlmError(Exception):
    pass


class NtlmAcceptor:
    """One NTLM handshake on one connection."""

    def __init__(self, netbios_domain: str, server_name: str = "EX01") -> None:
        self.domain = netbios_domain
        self.server_name = server_name
        self.challenge: bytes | None = None

    def challenge_for(self, negotiate_token: bytes) -> bytes:
        try:
            negotiate = Negotiate.unpack(negotiate_token)
        except Exception as e:
            raise NtlmError("malformed NTLM negotiate message") from e
        self.challenge = os.urandom(8)
        info = TargetInfo()
        info[AvId.nb_domain_name] = self.domain
        info[AvId.nb_computer_name] = self.server_name
        info[AvId.dns_domain_name] = self.domain.lower() + ".local"
        info[AvId.dns_computer_name] = self.server_name.lower()
        info[AvId.timestamp] = FileTime.now()
        flags = _SERVER_FLAGS & (negotiate.flags | NegotiateFlags.target_info | NegotiateFlags.target_type_domain)
        return Challenge(flags | NegotiateFlags.unicode, self.challenge, target_name=self.domain,
                         target_info=info).pack()

    @staticmethod
    def identity(authenticate_token: bytes) -> tuple[str, str]:
        """The (domain, user) an AUTHENTICATE message logs on as, before its password is checked."""
        try:
            auth = Authenticate.unpack(authenticate_token)
        except Exception as e:
            raise NtlmError("malformed NTLM authenticate message") from e
        return auth.domain_name or "", auth.user_name or ""

    def verify(self, authenticate_token: bytes, password_for: Callable[[str, str], str | None]) -> tuple[str, str]:
        """Check an AUTHENTICATE message; return (domain, user). ``password_for(domain, user)`` looks passwords up."""
        if self.challenge is None:
            raise NtlmError("NTLM authenticate without a challenge on this connection")
        try:
            auth = Authenticate.unpack(authenticate_token)
        except Exception as e:
            raise NtlmError("malformed NTLM authenticate message") from e
        user, domain = auth.user_name or "", auth.domain_name or ""
        nt_response = auth.nt_challenge_response or b""
        if not user or len(nt_response) <= 24:
            raise NtlmError("anonymous and NTLMv1 logons are refused")
        password = password_for(domain, user)
        if password is None:
            raise NtlmError("unknown user")
        key = ntowfv2(user, ntowfv1(password), domain)
        client = NTClientChallengeV2.unpack(nt_response[16:])
        expected, _, _ = compute_response_v2(key, self.challenge, client.challenge_from_client, client.time_stamp,
                                             client.av_pairs)
        if not hmac.compare_digest(expected[:16], nt_response[:16]):
            raise NtlmError("wrong password")
        return domain, user

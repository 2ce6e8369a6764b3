"""Domain errors. Each names what went wrong and what a person can do about it.

The gRPC layer maps each class to exactly one status code (see service.py); nothing
below the gRPC layer knows about status codes.
"""

from __future__ import annotations

# A message goes to the caller twice (grpc-message, percent-encoded, and grpc-status-details-bin, base64)
# in trailers gRPC limits to 16 KiB in all: past that the caller sees RESOURCE_EXHAUSTED, not the refusal.
# So a message is cut at MESSAGE_BYTES of UTF-8, and a caller's value it quotes at ECHO_CHARS characters.
MESSAGE_BYTES = 1024
ECHO_CHARS = 80
TRUNCATED = "…(truncated)"


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """repr of a value from the caller, for a message: cut after limit characters, saying so."""
    if isinstance(value, int) and value.bit_length() > 4 * limit:  # repr of a huge int is slow, or refused past 4300 digits
        return f"<a {value.bit_length()}-bit number>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + TRUNCATED


def capped(text: str, limit: int = MESSAGE_BYTES) -> str:
    """text cut to at most limit bytes of UTF-8, ending in TRUNCATED when it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - len(TRUNCATED.encode())].decode(errors="ignore") + TRUNCATED


class CaError(Exception):
    """Base of every error the daemon reports to a caller.

    message is the whole story, for the operator: the daemon's log, the CLI. caller_message is
    what a gRPC caller is told, and differs only where message names what is the operator's
    alone, such as a file's path (the host's layout): then it says what happened and what the
    caller can do (retry), and the log line of the refused call keeps message.
    """

    def __init__(self, message: str, *, rule: str = "", field: str = "", expected: str = "", caller_message: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        self.field = field
        self.expected = expected
        self.caller_message = caller_message or message


class InvalidRequest(CaError):
    """The request is malformed: not a CSR, a missing field, a bad serial (INVALID_ARGUMENT)."""


class PolicyViolation(InvalidRequest):
    """The request is well-formed but the issuance policy refuses it (INVALID_ARGUMENT)."""


class Unauthenticated(CaError):
    """The caller presented no acceptable client certificate: none, revoked, or over TLS < 1.3 (UNAUTHENTICATED)."""


class PermissionDenied(CaError):
    """The caller may not do this (PERMISSION_DENIED)."""


class AlreadyExists(CaError):
    """A conflicting record exists: request_id reused with another CSR, a duplicate device (ALREADY_EXISTS)."""


class NotFound(CaError):
    """The named object does not exist (NOT_FOUND)."""

    @classmethod
    def no_certificate(cls, serial_text: str) -> NotFound:
        """A serial with no certificates row; verification certificates, which the CA signs too, are not kept there."""
        return cls(
            f"no device certificate with serial {serial_text} was issued by this CA "
            "(verification certificates from IssueVerificationCertificate are recorded in the audit log only)",
            rule="serial",
            field="serial",
        )


class FailedPrecondition(CaError):
    """The system is not in a state that allows this (FAILED_PRECONDITION)."""


class QuotaExceeded(CaError):
    """The caller has had as many certificates this hour as its quota allows; later ones are refused (RESOURCE_EXHAUSTED)."""

    @classmethod
    def for_caller(cls, caller: str, limit: int, issued: int) -> QuotaExceeded:
        return cls(
            f"caller {caller!r} has had {issued} certificate(s) in the last hour, its quota is {limit} per hour; "
            f'retry later, or raise [callers."{caller}"] max_certificates_per_hour if the line really runs faster',
            rule="caller-quota",
            field="caller",
            expected=f"at most {limit} certificates per hour",
        )


class HsmUnavailable(CaError):
    """The token cannot be reached or refused the operation; retrying later may succeed (UNAVAILABLE)."""


class StoreUnavailable(CaError):
    """The database cannot be reached or is busy; retrying later may succeed (UNAVAILABLE)."""


class CaKeyChanged(CaError):
    """The CA key that signed a certificate stopped being the active key before the certificate was stored; it was
    discarded, and a retry with the same request_id is signed with the new key (UNAVAILABLE)."""


class Overloaded(CaError):
    """A worker already has as many calls in flight as it takes; retrying after a back-off may succeed (UNAVAILABLE)."""


class ConfigError(CaError):
    """The configuration is invalid; raised at start-up or reload, never mid-request."""


class LintFailure(CaError):
    """A certificate built by the CA failed its pre-issuance lint: a CA bug, not the caller's (INTERNAL)."""

"""The PKCS#11 token: the only module that imports `pkcs11`.

Every PKCS#11 call of a process runs on one dedicated thread. python-pkcs11 initialises
the module without CKF_OS_LOCKING_OK and SoftHSM crashed (SIGSEGV) when two threads
signed at once, so `Hsm` owns a single-thread executor; the signing call releases the
GIL, so the event loop keeps running while the token works. Scale across cores with
processes, each with its own `Hsm`.

`HsmEcPrivateKey`, `HsmRsaPrivateKey` and `HsmEd25519PrivateKey` look like
`cryptography` private keys whose `sign()` goes to the token, so `CertificateBuilder`
and `CertificateRevocationListBuilder` sign with a key they never see.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, unquote_to_bytes

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from ca_daemon.errors import ConfigError, FailedPrecondition, HsmUnavailable, NotFound
from ca_daemon.model import KeySpec
from ca_daemon.remote_keys import Buffer, EcKeyWithoutPrivateHalf, Ed25519KeyWithoutPrivateHalf, RsaKeyWithoutPrivateHalf
from ca_daemon.thread_names import name_os_thread

T = TypeVar("T")

_CURVE_OIDS = {KeySpec.EC_P256: "secp256r1", KeySpec.EC_P384: "secp384r1"}
_ED25519_OID = "1.3.101.112"
_RSA_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
# Errors after which the session or the token itself must be considered gone.
_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.DeviceError,
    pkcs11.exceptions.DeviceMemory,
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.TokenNotPresent,
    pkcs11.exceptions.TokenNotRecognised,
    pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.KeyHandleInvalid,
    pkcs11.exceptions.FunctionFailed,
    pkcs11.exceptions.NoSuchKey,
)
_RECONNECT_INTERVAL_S = 0.5
# SoftHSM answers CKR_GENERAL_ERROR when its configuration file or token directory is missing or unreadable.
_SOFTHSM_HINT = (
    " (SoftHSM says this when its configuration file, hsm.softhsm2_conf or SOFTHSM2_CONF, or the directories.tokendir"
    " it names is missing or unreadable)"
)
# The rule of a PIN the token refused (wrong or locked): never tried again by this process, since a real HSM
# locks the PIN after a few wrong logins; app.worker_main exits so that the supervisor stops rather than retries.
PIN_REFUSED = "pin-refused"
_OPEN_ATTEMPTS = 4


class _TransientHsmError(HsmUnavailable):
    """A failure to reach the token that may pass (not a wrong PIN, not a missing token)."""


# ---------------------------------------------------------------------------
# RFC 7512 URIs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 `pkcs11:` URI this daemon uses to find a key.

    Hand-written: the URI grammar is a few path attributes separated by ';' and no
    maintained Python library parses it; urllib does the percent-decoding.
    """

    token: str
    label: str = ""
    key_id: bytes = b""

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not uri.startswith("pkcs11:"):
            raise ConfigError(f"not a PKCS#11 URI (must start with 'pkcs11:'): {uri!r}")
        path = uri[len("pkcs11:") :].split("?", 1)[0]
        attributes: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"PKCS#11 URI attribute {part!r} has no '=' in {uri!r}")
            attributes[name] = value
        token = unquote(attributes.get("token", ""))
        if not token:
            raise ConfigError(f"PKCS#11 URI {uri!r} must name the token (token=...)")
        label = unquote(attributes.get("object", ""))
        key_id = unquote_to_bytes(attributes.get("id", ""))
        if not label and not key_id:
            raise ConfigError(f"PKCS#11 URI {uri!r} must name the key (object=... or id=...)")
        return cls(token=token, label=label, key_id=key_id)

    def __str__(self) -> str:
        parts = [f"token={quote(self.token, safe='')}"]
        if self.label:
            parts.append(f"object={quote(self.label, safe='')}")
        if self.key_id:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.key_id))
        return "pkcs11:" + ";".join(parts)


# ---------------------------------------------------------------------------
# The token
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedKey:
    """What a key generation returns: where the key is and its public half."""

    uri: Pkcs11Uri
    spec: KeySpec
    public_key_der: bytes


class Hsm:
    """A logged-in connection to one token, with every call on one thread."""

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        self._module_path = module_path
        self._token_label = token_label
        self._pin = pin
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11", initializer=name_os_thread)
        self._thread_id: int | None = None
        self._lib: Any = None
        self._session: Any = None
        self._keys: dict[Pkcs11Uri, Any] = {}
        self._broken = False
        self._pin_refused: HsmUnavailable | None = None
        self._last_attempt = 0.0
        self._closed = False
        # Called with the seconds each token signature took (the metrics' HSM sign latency).
        self.sign_observer: Callable[[float], None] | None = None

    @property
    def token_label(self) -> str:
        return self._token_label

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def open(cls, module_path: str, token_label: str, pin: str) -> Hsm:
        """Log in to the token or raise HsmUnavailable/ConfigError with a one-line reason."""
        if not os.path.exists(module_path):
            raise ConfigError(f"PKCS#11 module not found: {module_path}")
        hsm = cls(module_path, token_label, pin)
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                hsm.run(hsm._connect)
                return hsm
            except _TransientHsmError:
                # Several processes opening one SoftHSM token at the same instant have
                # seen CKR_GENERAL_ERROR; a wrong PIN or a missing token is not retried.
                if attempt == _OPEN_ATTEMPTS - 1:
                    hsm.close()
                    raise
                time.sleep(0.2 * (attempt + 1))
            except BaseException:
                hsm.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Log out and release the module; further calls raise HsmUnavailable."""
        if self._closed:
            return

        def _close() -> None:
            self._drop_session()

        try:
            self.run(_close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    def __enter__(self) -> Hsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def healthy(self) -> bool:
        return not self._broken and not self._closed

    async def probe(self) -> bool:
        """healthy, after trying to reconnect (on the PKCS#11 thread) if the token went away.

        Without it only a call needing the token reconnected, and health follows the token
        rather than the traffic: a load balancer that stops sending Sign calls to a worker
        reporting NOT_SERVING would never have brought it back.
        """
        if not self._closed:
            # Also while healthy: an idle worker reported SERVING through a whole outage, as nothing touched the token.
            with contextlib.suppress(HsmUnavailable):
                await self.run_async(lambda: self._guarded("a health probe", self._check_token_present))
        return self.healthy

    def run(self, fn: Callable[[], T]) -> T:
        """Run fn on the PKCS#11 thread and wait for it (directly, if already there)."""
        if threading.get_ident() == self._thread_id:
            return fn()
        if self._closed:
            raise HsmUnavailable("the HSM connection is closed")
        return self._executor.submit(self._on_thread, fn).result()

    def run_async(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run fn on the PKCS#11 thread without blocking the event loop.

        Callers put a whole signing job here (build, then sign), so a request costs one
        hop to this thread rather than one per PKCS#11 call.
        """
        if self._closed:
            raise HsmUnavailable("the HSM connection is closed")
        return asyncio.wrap_future(self._executor.submit(self._on_thread, fn))

    def _on_thread(self, fn: Callable[[], T]) -> T:
        self._thread_id = threading.get_ident()
        return fn()

    def _connect(self) -> None:
        loaded = self._lib is not None
        try:
            if loaded:
                self._lib.reinitialize()
            else:
                self._lib = pkcs11.lib(self._module_path)
            token = self._lib.get_token(token_label=self._token_label)
        except pkcs11.exceptions.NoSuchToken:
            raise HsmUnavailable(
                f"PKCS#11 token {self._token_label!r} not found in module {self._module_path}",
                # A caller learns that the HSM is unavailable, not where the host keeps its PKCS#11 module.
                caller_message=f"the HSM is unavailable: its token {self._token_label!r} is not reachable; retry later",
            ) from None
        except pkcs11.exceptions.PKCS11Error as exc:
            if type(exc) is pkcs11.exceptions.PKCS11Error and not loaded:  # the base class: dlopen failed, not C_Initialize
                raise ConfigError(f"cannot load PKCS#11 module {self._module_path}: {str(exc)[:300]}") from None
            raise _TransientHsmError(
                f"cannot reach PKCS#11 token {self._token_label!r}: {type(exc).__name__} from module {self._module_path}"
                f"{_SOFTHSM_HINT if 'softhsm' in self._module_path.lower() else ''}"
            ) from None
        try:
            self._session = token.open(user_pin=self._pin, rw=True)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # Login state is per application: another connection of this process logged in.
            self._session = token.open(rw=True)
        except pkcs11.exceptions.PinIncorrect:
            self._pin_refused = HsmUnavailable(f"wrong PIN for PKCS#11 token {self._token_label!r}", rule=PIN_REFUSED)
            raise self._pin_refused from None
        except pkcs11.exceptions.PinLocked:
            self._pin_refused = HsmUnavailable(f"the user PIN of PKCS#11 token {self._token_label!r} is locked", rule=PIN_REFUSED)
            raise self._pin_refused from None
        except pkcs11.exceptions.PKCS11Error as exc:
            raise _TransientHsmError(f"cannot log in to PKCS#11 token {self._token_label!r}: {type(exc).__name__}") from None
        self._keys.clear()
        self._broken = False

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        self._keys.clear()
        if session is not None:
            with contextlib.suppress(pkcs11.exceptions.PKCS11Error):
                session.close()

    def _guarded(self, operation: str, fn: Callable[[], T]) -> T:
        """Run fn on this thread, reconnecting first if the token went away earlier.

        A connection-level failure marks the token broken and reports UNAVAILABLE; the
        next call tries to reconnect (at most every half second), so service resumes
        without a restart once the token is back.
        """
        if self._pin_refused is not None:  # the token's PIN changed under a running worker: no login is tried again
            raise self._pin_refused
        if self._broken or self._session is None:
            now = time.monotonic()
            if now - self._last_attempt < _RECONNECT_INTERVAL_S:
                raise HsmUnavailable(f"the HSM is unavailable; {operation} was not attempted, retry shortly")
            self._last_attempt = now
            self._drop_session()
            self._connect()
        try:
            return fn()
        except _CONNECTION_ERRORS as exc:
            self._broken = True
            raise HsmUnavailable(f"the HSM failed during {operation} ({type(exc).__name__}); retry shortly") from None

    # -- keys --------------------------------------------------------------

    def generate_key(self, spec: KeySpec, label: str) -> GeneratedKey:
        """Generate a key pair inside the token: sensitive, never extractable."""

        def _generate() -> GeneratedKey:
            key_id = secrets.token_bytes(8)
            private_template = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            }
            public_template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
            }
            session = self._session
            if spec.family == "rsa":
                public_template[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
                public, private = session.generate_keypair(
                    KeyType.RSA,
                    spec.rsa_bits,
                    id=key_id,
                    label=label,
                    store=True,
                    public_template=public_template,
                    private_template=private_template,
                )
            else:
                if spec.family == "ec":
                    key_type, oid, mechanism = KeyType.EC, _CURVE_OIDS[spec], Mechanism.EC_KEY_PAIR_GEN
                else:
                    key_type, oid, mechanism = KeyType.EC_EDWARDS, _ED25519_OID, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
                params = session.create_domain_parameters(key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)}, local=True)
                public, private = params.generate_keypair(
                    id=key_id,
                    label=label,
                    store=True,
                    mechanism=mechanism,
                    public_template=public_template,
                    private_template=private_template,
                )
            uri = Pkcs11Uri(token=self._token_label, label=label, key_id=key_id)
            self._keys[uri] = private
            return GeneratedKey(uri=uri, spec=spec, public_key_der=_public_key_der(spec, public))

        return self.run(lambda: self._guarded("key generation", _generate))

    def supports(self, spec: KeySpec) -> bool:
        """Whether the token offers the mechanisms to generate and sign with this key type."""

        def _supports() -> bool:
            mechanisms = set(self._session.token.slot.get_mechanisms())
            if spec.family == "rsa":
                return Mechanism.RSA_PKCS_KEY_PAIR_GEN in mechanisms and Mechanism.SHA256_RSA_PKCS in mechanisms
            if spec.family == "ec":
                return Mechanism.EC_KEY_PAIR_GEN in mechanisms and Mechanism.ECDSA in mechanisms
            return Mechanism.EC_EDWARDS_KEY_PAIR_GEN in mechanisms and Mechanism.EDDSA in mechanisms

        return self.run(lambda: self._guarded("mechanism query", _supports))

    def key_spec(self, uri: Pkcs11Uri) -> KeySpec:
        """Read the algorithm and size of a stored private key."""

        def _spec() -> KeySpec:
            public = self._public_key(uri)
            return _spec_of(public)

        return self.run(lambda: self._guarded("key lookup", _spec))

    def public_key_der(self, uri: Pkcs11Uri) -> bytes:
        """The SubjectPublicKeyInfo of a stored key, read from its public half in the token."""

        def _read() -> bytes:
            public = self._public_key(uri)
            return _public_key_der(_spec_of(public), public)

        return self.run(lambda: self._guarded("key lookup", _read))

    def destroy_key(self, uri: Pkcs11Uri) -> None:
        """Delete both halves of a key pair from the token."""

        def _destroy() -> None:
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for obj in self._session.get_objects(_search_template(uri, object_class)):
                    obj.destroy()
            self._keys.pop(uri, None)

        self.run(lambda: self._guarded("key destruction", _destroy))

    def private_key(self, uri: Pkcs11Uri) -> HsmPrivateKey:
        """A `cryptography`-compatible private key whose signatures are made in the token."""
        spec = self.key_spec(uri)
        public = serialization.load_der_public_key(self.public_key_der(uri))
        if spec.family == "ec":
            assert isinstance(public, ec.EllipticCurvePublicKey)
            return HsmEcPrivateKey(self, uri, public)
        if spec.family == "rsa":
            assert isinstance(public, rsa.RSAPublicKey)
            return HsmRsaPrivateKey(self, uri, public)
        assert isinstance(public, ed25519.Ed25519PublicKey)
        return HsmEd25519PrivateKey(self, uri, public)

    def sign_raw(self, uri: Pkcs11Uri, data: bytes, mechanism: str) -> bytes:
        """Sign with a token key: 'ecdsa' takes a digest, 'eddsa' the message, 'sha256-rsa' etc. the message."""
        mech = {
            "ecdsa": Mechanism.ECDSA,
            "eddsa": Mechanism.EDDSA,
            **{f"{name}-rsa": m for name, m in _RSA_MECHANISMS.items()},
        }[mechanism]

        def _sign() -> bytes:
            key = self._private_key(uri)
            started = time.perf_counter()
            signature: bytes = key.sign(data, mechanism=mech)
            if self.sign_observer is not None:
                self.sign_observer(time.perf_counter() - started)
            return signature

        return self.run(lambda: self._guarded("signing", _sign))

    def _check_token_present(self) -> None:
        """C_GetTokenInfo: a connection error (handled by _guarded) if the token went away, else nothing.

        SoftHSM's session of a token that went away finds no objects and reports no error, also once
        the token is back: a key looked up then was NOT_FOUND, for good, until a restart.
        """
        self._session.token.slot.get_token()

    def _private_key(self, uri: Pkcs11Uri) -> Any:
        key = self._keys.get(uri)
        if key is None:
            matches = list(self._session.get_objects(_search_template(uri, ObjectClass.PRIVATE_KEY)))
            if not matches:
                self._check_token_present()
                raise NotFound(f"no private key matching {uri} in the token")
            if len(matches) > 1:
                raise FailedPrecondition(f"{len(matches)} private keys match {uri}; name the key by id")
            key = self._keys[uri] = matches[0]
        return key

    def _public_key(self, uri: Pkcs11Uri) -> Any:
        matches = list(self._session.get_objects(_search_template(uri, ObjectClass.PUBLIC_KEY)))
        if not matches:
            self._check_token_present()
            raise NotFound(f"no public key matching {uri} in the token")
        if len(matches) > 1:
            raise FailedPrecondition(f"{len(matches)} public keys match {uri}; name the key by id")
        return matches[0]

    def private_key_attributes(self, uri: Pkcs11Uri) -> dict[str, bool]:
        """The protection attributes of a stored private key, for checks and tests."""

        def _read() -> dict[str, bool]:
            key = self._private_key(uri)
            return {
                "token": bool(key[Attribute.TOKEN]),
                "private": bool(key[Attribute.PRIVATE]),
                "sensitive": bool(key[Attribute.SENSITIVE]),
                "extractable": bool(key[Attribute.EXTRACTABLE]),
            }

        return self.run(lambda: self._guarded("attribute read", _read))


def _search_template(uri: Pkcs11Uri, object_class: ObjectClass) -> dict[Attribute, Any]:
    template: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if uri.label:
        template[Attribute.LABEL] = uri.label
    if uri.key_id:
        template[Attribute.ID] = uri.key_id
    return template


def _spec_of(public: Any) -> KeySpec:
    key_type = public[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        return KeySpec(f"rsa-{public.key_length}")
    if key_type == KeyType.EC_EDWARDS:
        return KeySpec.ED25519
    loaded = serialization.load_der_public_key(encode_ec_public_key(public))
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    return {"secp256r1": KeySpec.EC_P256, "secp384r1": KeySpec.EC_P384}[loaded.curve.name]


def _public_key_der(spec: KeySpec, public: Any) -> bytes:
    if spec.family == "ec":
        return encode_ec_public_key(public)
    if spec.family == "rsa":
        loaded = serialization.load_der_public_key(encode_rsa_public_key(public))
    else:
        point = bytes(public[Attribute.EC_POINT])
        # CKA_EC_POINT is a DER OCTET STRING around the 32 raw bytes (0x04 0x20 ...).
        raw = point[2:] if len(point) == 34 and point[:2] == b"\x04\x20" else point
        loaded = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    return loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------------------
# cryptography adapters
# ---------------------------------------------------------------------------


class HsmPrivateKey:
    """Common part of the adapters: which token key (the public half comes with remote_keys)."""

    NO_PRIVATE_HALF = "the private key lives in the HSM and cannot be exported or used for this operation"
    hsm: Hsm
    uri: Pkcs11Uri


class HsmEcPrivateKey(HsmPrivateKey, EcKeyWithoutPrivateHalf):
    """An EC key in the token. SoftHSM 2.6 lacks CKM_ECDSA_SHA256: hash here, sign the digest there."""

    def __init__(self, hsm: Hsm, uri: Pkcs11Uri, public: ec.EllipticCurvePublicKey) -> None:
        super().__init__(public)
        self.hsm, self.uri = hsm, uri

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        data = bytes(data)
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA signatures are supported")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            digest = data
        else:
            assert isinstance(algorithm, hashes.HashAlgorithm)
            digest = _digest(algorithm, data)
        raw = self.hsm.sign_raw(self.uri, digest, "ecdsa")
        # CKM_ECDSA returns r || s; X.509 wants the DER ECDSA-Sig-Value. cryptography's
        # encoder is several times faster than asn1crypto's (pkcs11.util.ec).
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


class HsmRsaPrivateKey(HsmPrivateKey, RsaKeyWithoutPrivateHalf):
    """An RSA key in the token, signing PKCS#1 v1.5 with the hash done in the token."""

    def __init__(self, hsm: Hsm, uri: Pkcs11Uri, public: rsa.RSAPublicKey) -> None:
        super().__init__(public)
        self.hsm, self.uri = hsm, uri

    def sign(
        self,
        data: Buffer,
        padding: padding.AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        data = bytes(data)
        if padding.name != "EMSA-PKCS1-v1_5":
            raise TypeError("only PKCS#1 v1.5 RSA signatures are supported")
        if not isinstance(algorithm, hashes.HashAlgorithm) or algorithm.name not in _RSA_MECHANISMS:
            raise TypeError("RSA signatures need SHA-256, SHA-384 or SHA-512 over the message")
        return self.hsm.sign_raw(self.uri, data, f"{algorithm.name}-rsa")


class HsmEd25519PrivateKey(HsmPrivateKey, Ed25519KeyWithoutPrivateHalf):
    """An Ed25519 key in the token (CKM_EDDSA over the whole message)."""

    def __init__(self, hsm: Hsm, uri: Pkcs11Uri, public: ed25519.Ed25519PublicKey) -> None:
        super().__init__(public)
        self.hsm, self.uri = hsm, uri

    def sign(self, data: Buffer) -> bytes:
        return self.hsm.sign_raw(self.uri, bytes(data), "eddsa")


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    if algorithm.name in hashlib.algorithms_available:
        return hashlib.new(algorithm.name, data).digest()
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


# ---------------------------------------------------------------------------
# Token initialisation (the embedded SoftHSM default)
# ---------------------------------------------------------------------------

_CKF_TOKEN_INITIALIZED = 0x400
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
_CK_TOKEN_INFO_FLAGS_OFFSET = 96  # label[32] manufacturerID[32] model[16] serialNumber[16], then CK_FLAGS


def initialize_token(module_path: str, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a fresh token in the first free slot and set its user PIN.

    python-pkcs11 has no C_InitToken, and softhsm2-util and pkcs11-tool take PINs on the
    command line or a terminal; we never put a PIN in argv. So C_InitToken is called
    through ctypes here, and the user PIN is set with python-pkcs11 afterwards.
    """
    module = ctypes.CDLL(module_path)
    ulong = ctypes.c_ulong
    module.C_Initialize.argtypes = [ctypes.c_void_p]
    rv = module.C_Initialize(None)
    owns_initialisation = rv != _CKR_CRYPTOKI_ALREADY_INITIALIZED
    if owns_initialisation:
        _check(rv, "C_Initialize")
    else:
        # python-pkcs11 keeps the module initialised in this process, with the token directory as
        # it was read then; SoftHSM marks a token it once found missing (moved away, then back)
        # as broken until the next C_Initialize, and its C_GetTokenInfo would then fail the scan
        # below. Read the directory afresh.
        pkcs11.lib(module_path).reinitialize()
    try:
        count = ulong(0)
        _check(module.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)), "C_GetSlotList")
        slots = (ulong * count.value)()
        _check(module.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(count)), "C_GetSlotList")
        free_slot = None
        for slot in slots[: count.value]:
            info = ctypes.create_string_buffer(512)
            _check(module.C_GetTokenInfo(ulong(slot), info), "C_GetTokenInfo")
            flags = ulong.from_buffer_copy(info.raw[_CK_TOKEN_INFO_FLAGS_OFFSET : _CK_TOKEN_INFO_FLAGS_OFFSET + ctypes.sizeof(ulong)])
            if info.raw[:32].decode(errors="replace").rstrip() == label and flags.value & _CKF_TOKEN_INITIALIZED:
                raise FailedPrecondition(f"a token labelled {label!r} already exists")
            if free_slot is None and not flags.value & _CKF_TOKEN_INITIALIZED:
                free_slot = slot
        if free_slot is None:
            raise FailedPrecondition("the PKCS#11 module has no free slot for a new token")
        so = so_pin.encode()
        padded_label = label.encode().ljust(32, b" ")[:32]
        module.C_InitToken.argtypes = [ulong, ctypes.c_char_p, ulong, ctypes.c_char_p]
        _check(module.C_InitToken(ulong(free_slot), so, ulong(len(so)), padded_label), "C_InitToken")
    finally:
        if owns_initialisation:
            module.C_Finalize(None)
    lib = pkcs11.lib(module_path)
    lib.reinitialize()
    token = lib.get_token(token_label=label)
    with token.open(so_pin=so_pin, rw=True) as session:
        session.init_pin(user_pin)
    lib.reinitialize()


def _check(rv: int, function: str) -> None:
    if rv != 0:
        raise HsmUnavailable(f"{function} failed with CKR 0x{rv:x}")


def token_exists(module_path: str, label: str) -> bool:
    """Whether an initialised token with this label is present."""
    lib = pkcs11.lib(module_path)
    try:
        lib.get_token(token_label=label)
    except pkcs11.exceptions.NoSuchToken:
        return False
    return True

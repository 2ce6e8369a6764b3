"""cryptography's private-key types for keys whose private half this process does not hold.

cryptography's X.509 builders take any object of its abstract private-key types and use only
its public half (public_key(), key size, curve) and its sign(). Two kinds of key need that
shape: the HSM adapters (hsm.py: the private half stays in the token, which signs) and the
issuer's draft key (issuer.py: there is none, the signature is a placeholder). This is the part
they share: the public half, and a refusal of everything that would need the private one.
Subclasses implement sign() and say, in NO_PRIVATE_HALF, why there is no private half.
"""

from __future__ import annotations

from typing import Any, NoReturn, Self

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

Buffer = bytes | bytearray | memoryview  # what cryptography's key types sign


class _PublicHalfOnly:
    NO_PRIVATE_HALF = "this process does not hold the key's private half"

    def _no_private_half(self) -> NoReturn:
        raise TypeError(self.NO_PRIVATE_HALF)

    # Nothing to copy: the object names a key held elsewhere, or none.
    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class EcKeyWithoutPrivateHalf(_PublicHalfOnly, ec.EllipticCurvePrivateKey):
    def __init__(self, public: ec.EllipticCurvePublicKey) -> None:
        self._public = public

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._no_private_half()

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._no_private_half()

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        self._no_private_half()


class RsaKeyWithoutPrivateHalf(_PublicHalfOnly, rsa.RSAPrivateKey):
    def __init__(self, public: rsa.RSAPublicKey) -> None:
        self._public = public

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        self._no_private_half()

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        self._no_private_half()

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        self._no_private_half()


class Ed25519KeyWithoutPrivateHalf(_PublicHalfOnly, ed25519.Ed25519PrivateKey):
    def __init__(self, public: ed25519.Ed25519PublicKey) -> None:
        self._public = public

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        self._no_private_half()

    def private_bytes_raw(self) -> bytes:
        self._no_private_half()

"""ca-daemon: a certificate authority for IoT fleets whose CA keys live in a PKCS#11 HSM."""

__version__ = "0.1.0"

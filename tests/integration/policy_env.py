"""A CA environment with the profiles the policy tests exercise, served by a real daemon."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import CaEnv, make_env

EXTRA_PROFILES = r"""
[profiles.fleet]
description = "Fleet devices: O fixed, DNS and URN SANs bound to the device ID, nothing else"
device_id_pattern = '^[a-z0-9-]{3,32}$'
ec_curves = ["P-256"]
ed25519 = false
csr_signature_algorithms = ["ecdsa-with-SHA256", "sha256WithRSAEncryption"]
subject_required = ["CN", "O"]
san_templates = ["urn:dev:ops:{device_id}"]
requested_extensions = "refuse"

[profiles.fleet.subject_allowed]
O = '^Example Corp$'

[profiles.fleet.san_allowed]
dns = '^{device_id}\.devices\.example\.com$'
uri = '^urn:dev:ops:{device_id}$'

[profiles.open-cn]
description = "Any CN: shows the string rules on their own"
device_id_pattern = '^.*$'
subject_max_length = 64

[profiles.renewable]
description = "Re-issue allowed"
allow_reissue = true

[profiles.restricted]
description = "Not for the local developer"
"""

CALLERS = """[callers."local-developer"]
profiles = ["device", "fleet", "open-cn", "renewable"]

[callers."someone-else"]
profiles = ["restricted"]
"""


def make_policy_env(base: Path, softhsm_conf: Path, *, workers: int = 1) -> CaEnv:
    env = make_env(base, softhsm_conf, workers=workers)
    env.edit_config('[callers."local-developer"]\nprofiles = ["device"]\n', CALLERS)
    env.config_path.write_text(env.config_path.read_text() + EXTRA_PROFILES)
    return env

"""environ_block.blank_value: a PIN given in the environment leaves /proc/PID/environ, as read by anyone allowed to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import os, sys
from pathlib import Path
from ca_daemon.environ_block import blank_value
before = Path("/proc/self/environ").read_bytes()
found = blank_value("CA_TEST_PIN")
del os.environ["CA_TEST_PIN"]
after = Path("/proc/self/environ").read_bytes()
print(b"s3cret-pin-value" in before, found, b"s3cret-pin-value" in after, b"OTHER=kept" in after, blank_value("CA_TEST_ABSENT"))
"""


def test_the_value_is_overwritten_in_the_block_the_kernel_shows_and_other_variables_stay() -> None:
    env = {"CA_TEST_PIN": "s3cret-pin-value", "OTHER": "kept", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "False", "True", "False"], result.stdout + result.stderr

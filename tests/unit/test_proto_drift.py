"""The committed generated code must be exactly what protos/ generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_protos() -> None:
    assert _generator().drifted(REPO / "ca_daemon" / "_proto") == []


def test_drift_is_detected(tmp_path: Path) -> None:
    gen = _generator()
    copy = tmp_path / "_proto"
    gen.generate(copy)
    assert gen.drifted(copy) == []
    target = copy / "ca_daemon" / "v1" / "ca_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    assert gen.drifted(copy) == ["ca_daemon/v1/ca_pb2.py"]

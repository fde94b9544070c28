"""The committed gRPC stubs are exactly what `make proto` generates from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

GENERATED = ("tandem_pb2.py", "tandem_pb2_grpc.py", "tandem_pb2.pyi")


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    proto_dir = ROOT / "proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(proto_dir / "tandem/v1/tandem.proto")],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "tandem" / "v1" / name).read_text()
        committed = (proto_dir / "tandem" / "v1" / name).read_text()
        assert fresh == committed, f"proto/tandem/v1/{name} is stale: run `make proto` and commit"

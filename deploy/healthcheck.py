#!/opt/venv/bin/python
"""Ask a Tandem server's grpc.health.v1 service whether it is SERVING; exit 0 if so.

The serving image installs this as `tandem-healthcheck` and runs it for its
Docker HEALTHCHECK; the production Kubernetes overlay runs it as the exec
probe, because the kubelet's own gRPC probe cannot speak TLS. It uses the
grpcio and grpcio-health-checking packages the server already has, so the
image needs no extra binary.

    tandem-healthcheck                                   # 127.0.0.1:$TANDEM_PORT (50051), service ""
    tandem-healthcheck --service tandem.v1.Inference     # one service's status
    tandem-healthcheck --tls-ca /etc/tandem/tls/ca.crt --tls-server-name tandem

Every option can also come from the environment (TANDEM_HEALTHCHECK_<OPTION>,
e.g. TANDEM_HEALTHCHECK_TLS_CA), so that a pod sets TLS once for all its
probes. Health needs no token.

Exit status: 0 SERVING; 1 answered, but not SERVING (loading, shutting down,
or an unknown service name); 2 no answer (not listening, TLS failure,
timeout).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENV = "TANDEM_HEALTHCHECK_"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def env(name: str, default: str | None = None) -> str | None:
        return os.environ.get(ENV + name, default)

    p = argparse.ArgumentParser(prog="tandem-healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=env("TARGET", f"127.0.0.1:{os.environ.get('TANDEM_PORT', '50051')}"),
                   help="host:port of the server (default 127.0.0.1 and the server's TANDEM_PORT, or 50051)")
    p.add_argument("--service", default=env("SERVICE", ""),
                   help='health service name: "" (everything), tandem.v1.Inference, tandem.v1.Models or '
                   "tandem.v1.Collections")
    p.add_argument("--timeout", type=float, default=float(env("TIMEOUT", "3")), help="seconds to wait (default 3)")
    p.add_argument("--tls-ca", metavar="CA.pem", default=env("TLS_CA"),
                   help="connect with TLS and check the server's certificate against this CA")
    p.add_argument("--tls-cert", metavar="CERT.pem", default=env("TLS_CERT"),
                   help="client certificate, for a server that requires one (mTLS)")
    p.add_argument("--tls-key", metavar="KEY.pem", default=env("TLS_KEY"), help="private key of --tls-cert")
    p.add_argument("--tls-server-name", metavar="NAME", default=env("TLS_SERVER_NAME"),
                   help="a name the server's certificate carries (the target is 127.0.0.1, which it may not)")
    return p.parse_args(argv)


def channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.target)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("tandem-healthcheck: --tls-cert and --tls-key go together")

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.target, creds, options=options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.service or '""'
    with channel(args) as ch:
        try:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                          timeout=args.timeout).status
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                print(f"{args.target}: no health service named {name}")
                return 1
            print(f"{args.target}: no answer ({e.code().name}: {e.details()})")
            return 2
    print(f"{args.target} {name}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())

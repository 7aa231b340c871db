"""An haproxy configuration for serving replicas (deploy/pod.py) outside Kubernetes: health checks on the
gateway's `/v2/health/ready`, weighted round-robin (a weight is a traffic share, for canaries), and retries on
another replica where a request cannot have been served (connection refused or reset, no answer, 503), so
losing or draining a replica fails no request.

    python -m deploy.balancer --listen 0.0.0.0:8080 --server r1=10.0.0.11:8090 --server r2=10.0.0.12:8090 > haproxy.cfg
    haproxy -f haproxy.cfg

Weights (a canary's share) and drains are changed at run time through the admin socket:
    echo "set weight replicas/r3 10" | socat stdio /run/haproxy/admin.sock
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BACKEND = "replicas"
# A request body is retried from haproxy's buffer: it must fit. 256 KiB holds a phone JPEG at serving size;
# larger bodies are still served, but not retried by haproxy (the client's own retries remain).
BUFFER_BYTES = 256 * 1024


def haproxy_config(listen: str, servers: dict[str, str], admin_socket: Path, weights: dict[str, int] | None = None,
                   check_ms: int = 500) -> str:
    """haproxy.cfg text: `servers` maps a name to the gateway's HOST:PORT of each replica."""
    weights = weights or {}
    lines = [
        "global",
        "    maxconn 1024",
        f"    tune.bufsize {BUFFER_BYTES}",
        f"    stats socket {admin_socket} mode 600 level admin",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-request 10s",
        # Keep the whole body, so a request that met a dead or draining replica can go to another one.
        "    option http-buffer-request",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response response-timeout 503",
        "",
        "frontend inference",
        f"    bind {listen}",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        "    balance roundrobin",  # weighted: a weight is a traffic share (canaries)
        "    option httpchk GET /v2/health/ready",
        "    http-check expect status 200",
        # Two failed checks take a replica out (~1 s), two passing ones bring it back.
        f"    default-server check inter {check_ms}ms fastinter {check_ms // 2}ms downinter {check_ms * 2}ms "
        "fall 2 rise 2",
    ]
    lines += [f"    server {name} {address} weight {weights.get(name, 100)}" for name, address in servers.items()]
    return "\n".join(lines) + "\n"


def server_arg(value: str) -> tuple[str, str]:
    name, sep, address = value.partition("=")
    if not sep or not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {value!r}")
    return name, address


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT clients call")
    p.add_argument("--server", type=server_arg, action="append", required=True,
                   help="NAME=HOST:PORT of a replica's gateway (repeat)")
    p.add_argument("--admin-socket", type=Path, default=Path("/run/haproxy/admin.sock"))
    args = p.parse_args(argv)
    sys.stdout.write(haproxy_config(args.listen, dict(args.server), args.admin_socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())

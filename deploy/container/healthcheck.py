"""The container's HEALTHCHECK: exit 0 when the gateway's /v2/health/ready answers 200, else 1.

Standard library only (the slim image has no curl). The address is the pod's own, GATEWAY_HTTP; a wildcard host
is probed on loopback. During a drain ready answers 503, so the check fails, as it should.

    python deploy/container/healthcheck.py
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "[::]", "::"}


def ready_url(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"http://{'127.0.0.1' if host in WILDCARDS else host}:{port}/v2/health/ready"


def main() -> int:
    url = ready_url(os.environ.get("GATEWAY_HTTP", "127.0.0.1:8090"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a proxy in the env must not answer
    try:
        with opener.open(url, timeout=3) as reply:
            return 0 if reply.status == 200 else 1
    except urllib.error.HTTPError as e:
        print(f"{url}: {e.code} {e.read()[:200].decode(errors='replace')}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as e:
        print(f"{url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

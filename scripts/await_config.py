#!/usr/bin/env python3
"""Runs COMMAND (the renderer swapping new xDS files into DIR), then waits until the running
Envoy has those files in force.

`gateway-render --xds DIR` writes each file with a `version_info` (a digest of its content).
Envoy reports, in its admin `/config_dump`, the version of every listener, cluster set, route
table and extension config it applied. This returns 0 once every file's version is the one in
force (the listener active, not warming), 1 if Envoy refused a file or the time ran out.

usage: await_config.py --xds DIR --admin (UNIX_SOCKET | HOST:PORT) [--timeout SECONDS] [-- COMMAND...]

The count of updates Envoy refused is read before COMMAND runs, so a refusal that comes at once
is still seen.
"""
import argparse
import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def admin_get_text(admin: str, path: str) -> str:
    if ":" in admin and not admin.startswith(("/", ".")):
        host, _, port = admin.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
    else:
        conn = UnixHTTPConnection(admin, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read().decode()
        if r.status != 200:
            raise OSError(f"admin {path}: HTTP {r.status}")
        return body
    finally:
        conn.close()


def admin_get(admin: str, path: str) -> dict:
    return json.loads(admin_get_text(admin, path))


def wanted(xds: Path) -> dict:
    out = {}
    for name in ("lds.json", "cds.json", "rds.json", "ecds.json"):
        version = json.loads((xds / name).read_text()).get("version_info")
        if not version:
            raise SystemExit(f"{xds / name} has no version_info: render it with this gateway-render")
        out[name] = version
    return out


def in_force(dump: dict) -> dict:
    """The versions Envoy has in force, by the file they come from."""
    got = {}
    for config in dump.get("configs", []):
        kind = config.get("@type", "")
        if kind.endswith("ListenersConfigDump"):
            listeners = config.get("dynamic_listeners", [])
            # In force means active: a listener still warming serves nothing of the new version.
            if any("warming_state" in l for l in listeners):
                continue
            got["lds.json"] = config.get("version_info")
        elif kind.endswith("ClustersConfigDump"):
            got["cds.json"] = config.get("version_info")
        elif kind.endswith("RoutesConfigDump"):
            versions = {r.get("version_info") for r in config.get("dynamic_route_configs", [])}
            if len(versions) == 1:
                got["rds.json"] = versions.pop()
        elif kind.endswith("EcdsConfigDump"):
            versions = {f.get("version_info") for f in config.get("ecds_filters", [])}
            if len(versions) == 1:
                got["ecds.json"] = versions.pop()
    return got


def rejected(admin: str) -> list:
    """xDS updates Envoy refused since it started (a bad file leaves the old version in force)."""
    text = admin_get_text(admin, "/stats?filter=update_rejected$")
    return [l for l in text.splitlines() if not l.endswith(": 0")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--xds", required=True)
    ap.add_argument("--admin", required=True)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("command", nargs="*")
    args = ap.parse_args()
    before = rejected(args.admin)
    if args.command:
        done = subprocess.run(args.command)
        if done.returncode != 0:
            return done.returncode
    want = wanted(Path(args.xds))
    deadline = time.monotonic() + args.timeout
    got = {}
    while time.monotonic() < deadline:
        got = in_force(admin_get(args.admin, "/config_dump"))
        if all(got.get(k) == v for k, v in want.items()):
            print(f"in force: {', '.join(f'{k[:-5]} {v}' for k, v in want.items())}")
            return 0
        now = rejected(args.admin)
        if now != before:
            print(f"Envoy refused the update: {'; '.join(now)}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    missing = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
    print(f"not in force after {args.timeout:g} s (wanted, in force): {missing}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

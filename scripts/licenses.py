#!/usr/bin/env python3
"""`make lint`: every crate linked into the shipped artifacts (the filter module and the
renderer, normal dependencies only) has a licence the project accepts, read from `cargo
metadata` for both targets. The accepted licences and advisories are written down in deny.toml, which
`cargo deny check` reads where cargo-deny is installed (its advisory database is fetched from
GitHub, which this machine cannot reach)."""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ["gateway-filter", "gateway-render"]


def allowed_licences() -> set:
    return set(tomllib.loads((ROOT / "deny.toml").read_text())["licenses"]["allow"])


def acceptable(expr: str, allow: set) -> bool:
    """An SPDX expression (`A OR B`, `A AND B`, `A/B`, `WITH` exceptions) is acceptable when
    every AND-part has an allowed OR-alternative."""
    expr = expr.replace("/", " OR ").replace("(", " ").replace(")", " ")
    expr = re.sub(r"\s+WITH\s+\S+", "", expr)
    for part in re.split(r"\s+AND\s+", expr.strip()):
        if not any(alt.strip() in allow for alt in re.split(r"\s+OR\s+", part)):
            return False
    return True


def main() -> int:
    packages, seen = {}, set()
    for target in ("wasm32-wasip1", "x86_64-unknown-linux-gnu"):
        meta = json.loads(subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--filter-platform", target],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        packages.update({p["id"]: p for p in meta["packages"]})
        nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
        stack = [p["id"] for p in meta["packages"] if p["name"] in ROOTS]
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            for dep in nodes[pid]["deps"]:
                if any(k["kind"] is None for k in dep["dep_kinds"]):
                    stack.append(dep["pkg"])
    allow = allowed_licences()
    bad = []
    for pid in sorted(seen, key=lambda i: packages[i]["name"]):
        p = packages[pid]
        if p["source"] is None:
            continue  # the workspace's own crates
        if not p.get("license") or not acceptable(p["license"], allow):
            bad.append(f"{p['name']} {p['version']}: {p.get('license')!r}")
    if bad:
        print("licences not accepted (deny.toml [licenses] allow):\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"licences: {len(seen) - len(ROOTS)} crates, all accepted")
    return 0


if __name__ == "__main__":
    sys.exit(main())

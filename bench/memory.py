"""`make bench`, memory: where an Envoy with the gateway module spends its memory, per worker count.

For `--concurrency` 1, 2 and 4, three Envoys in turn, each alone on the machine:
  A      the router alone (plain bootstrap)
  X      the gateway file's bootstrap with an empty proxy-wasm module (bench/empty_filter.wat): V8
         and the rendered bootstrap, no policy
  C      the same bootstrap with the gateway module, full policy
  C-min  the gateway module with a minimal configuration (one open route: no JWT, buckets,
         revocation or logs): what the configuration's own tables add
Each is sampled after configure (3 s idle) and after at least 100 000 requests (C, C-min). Per
sample: RSS; Envoy's heap as tcmalloc reports it (admin `/memory`: live bytes, and free bytes it
keeps: page heap and thread caches); V8's jitted code (the process's rwx mappings); and the
modules' linear memories (each V8 wasm memory is an 8 GiB reservation whose accessible head is the
memory itself: the resident part of those heads).
"""

import json
import re
import subprocess
import time
from pathlib import Path

import bench as B

WORKERS = (1, 2, 4)
REQUESTS = 100_000


def regions(pid):
    out, cur = [], None
    for line in open(f"/proc/{pid}/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        if m:
            cur = {"start": int(m.group(1), 16), "end": int(m.group(2), 16), "perm": m.group(3), "rss": 0}
            out.append(cur)
        elif line.startswith("Rss:") and cur is not None:
            cur["rss"] = int(line.split()[1]) * 1024
    return out


def sample(pid, admin):
    mb = lambda b: b / 2**20  # noqa: E731
    rs = regions(pid)
    linear, vms = 0, 0
    for i, r in enumerate(rs):
        # A wasm memory: a PROT_NONE reservation of 8 GiB, its accessible head right before it.
        if r["perm"] == "---p" and r["end"] - r["start"] >= 4 << 30 and i > 0:
            head = rs[i - 1]
            if head["end"] == r["start"] and head["perm"] == "rw-p":
                linear += head["rss"]
                vms += 1
    code = sum(r["rss"] for r in rs if r["perm"] == "rwxp")
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    heap = json.loads(subprocess.run(["curl", "-s", f"http://127.0.0.1:{admin}/memory"], capture_output=True,
                                     text=True, check=True).stdout)
    live = int(heap["allocated"])
    free = int(heap["pageheap_free"]) + int(heap["total_thread_cache"])
    return {"rss": mb(rss), "live": mb(live), "free": mb(free), "code": mb(code), "linear": mb(linear), "vms": vms}


def load(port, token, path, own):
    """At least REQUESTS requests; errors fail the run only for the gateway's own systems."""
    done = 0
    while done < REQUESTS:
        out = subprocess.run(["wrk", "-t1", "-c8", "-d2s", "-H", f"Authorization: Bearer {token}",
                              f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
        count = re.search(r"(\d+) requests in", out)
        if count is None or (own and re.search(r"Non-2xx or 3xx responses|Socket errors", out)):
            raise SystemExit(f"bench memory: errors or no answers on port {port}:\n{out}")
        done += int(count.group(1))
    return done


def minimal_file(upstream):
    route = {"name": "bench", "prefix": "/bench", "upstream": f"http://127.0.0.1:{upstream}", "methods": ["GET"],
             "auth_required": False}
    return {"gateway": {"prefix": "/api/v1", "cors": {"enabled": False}}, "jwt": {"secret_env": "JWT_SECRET"},
            "routes": [route], "logs": {"enabled": False}}


def measure(tmp, nginx_port, webdis_port, token, path, empty):
    """Runs the systems at each worker count; returns {workers: {system: {"configured": s, "loaded": s}}}."""
    results = {}
    for workers in WORKERS:
        rows = {}
        for name in ("A", "X", "C", "C-min"):
            port, admin = B.free_port(), B.free_port()
            if name == "A":
                boot = B.plain_bootstrap(port, admin, nginx_port, [])
            else:
                gw = minimal_file(nginx_port) if name == "C-min" else B.gateway_file(nginx_port, webdis_port)
                gw["gateway"].update(port=port, address="127.0.0.1", admin={"address": "127.0.0.1", "port": admin})
                boot = B.render_to_json(gw, tmp, f"mem-{name}", empty if name == "X" else B.WASM)
            cfg = tmp / f"mem-{name}-{workers}.json"
            cfg.write_text(json.dumps(boot))
            proc = B.Proc([str(B.ENVOY), "-c", str(cfg), "--concurrency", str(workers), "--disable-hot-restart",
                           "-l", "warn"], tmp / f"mem-{name}-{workers}.log", env=dict(B.os.environ, JWT_SECRET=B.SECRET))
            try:
                B.wait_port(port)
                time.sleep(3)
                row = {"configured": sample(proc.p.pid, admin)}
                load(port, token, path, name.startswith("C"))
                time.sleep(2)
                row["loaded"] = sample(proc.p.pid, admin)
                rows[name] = row
            finally:
                proc.stop()
        results[workers] = rows
        c, x = rows["C"]["loaded"], rows["X"]["loaded"]
        print(f"memory, {workers} worker(s): A {rows['A']['loaded']['rss']:.1f} MB, X {x['rss']:.1f}, "
              f"C {c['rss']:.1f} (C over X {c['rss'] - x['rss']:.1f} MB)", flush=True)
    return results


def report(results):
    lines = ["| workers | VMs | A | X | C configured | C after 100k | C-min after 100k | C over X | "
             "of which: heap live | heap kept free | V8 code | linear memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    over = {}
    for workers, rows in results.items():
        a, x, c, cm = (rows[n]["loaded"] for n in ("A", "X", "C", "C-min"))
        over[workers] = c["rss"] - x["rss"]
        lines.append(
            f"| {workers} | {c['vms']} | {a['rss']:.1f} | {x['rss']:.1f} | {rows['C']['configured']['rss']:.1f} | "
            f"{c['rss']:.1f} | {cm['rss']:.1f} | +{over[workers]:.1f} | {c['live'] - x['live']:+.1f} | "
            f"{c['free'] - x['free']:+.1f} | {c['code'] - x['code']:+.1f} | {c['linear']:.1f} "
            f"({c['linear'] / max(c['vms'], 1):.2f} per VM) |")
    one = over.get(1)
    steps = [(over[b] - over[a]) / (b - a) for a, b in zip(WORKERS, WORKERS[1:]) if a in over and b in over]
    per_worker = max(steps) if steps else float("nan")
    verdict = B.verdict
    lines += ["", "Memory in MB (RSS; the breakdown is C's minus X's, the linear memory C's own). Targets: "
                  f"module-specific memory (C over X) at 1 worker ≤ 15 MB: +{one:.1f} MB {verdict(one <= 15)}; "
                  f"per added worker ≤ 5 MB: {per_worker:+.1f} MB {verdict(per_worker <= 5)}."]
    return "\n".join(lines)

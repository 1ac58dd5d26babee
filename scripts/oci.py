#!/usr/bin/env python3
"""`make oci`: the optimised module as an OCI image Istio's image fetcher accepts, written as an
OCI image-layout archive without a Docker daemon.

The image is the "compat" variant Istio documents: a `FROM scratch` image whose last (and only)
layer, `tar+gzip`, holds `plugin.wasm`. The archive is reproducible (fixed timestamps, owners
and order), so the same module always gives the same digest to pin in a WasmPlugin
(`url: oci://<registry>/<repo>@sha256:<digest>`). Push it with any OCI tool, e.g.
`skopeo copy oci-archive:build/gateway-filter.oci.tar docker://registry.example.com/gateway-filter:0.1.0`.

    scripts/oci.py [--wasm build/gateway_filter.wasm] [--out build/gateway-filter.oci.tar] [--tag 0.1.0]
                   [--registry registry.example.com] [--istio-dir build/istio]
                   [--envoy-gateway-dir build/envoy-gateway]

It also writes the manifests of `envoy/istio/` into `--istio-dir` and those of
`envoy/envoy-gateway/` into `--envoy-gateway-dir` with REGISTRY and DIGEST filled in, so the
WasmPlugins and the EnvoyExtensionPolicy pin exactly this image (Envoy Gateway's image fetcher,
`internal/wasm/imagefetcher.go`, is Istio's and takes the same "compat" variant).
"""

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def tar_bytes(files):
    """A reproducible tar of (name, bytes) pairs: mode 0644, owner 0, mtime 0."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(wasm: bytes, tag: str):
    """The image layout as (path, bytes) pairs, and the manifest's digest."""
    layer_tar = tar_bytes([("plugin.wasm", wasm)])
    layer = gzip.compress(layer_tar, compresslevel=9, mtime=0)
    config = json.dumps({
        "architecture": "wasm", "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
        "history": [{"created_by": "COPY gateway_filter.wasm ./plugin.wasm"}],
    }, separators=(",", ":"), sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER, "digest": digest(layer), "size": len(layer)}],
        "annotations": {"org.opencontainers.image.title": "gateway-filter",
                        "org.opencontainers.image.description": "API-gateway policy filter for Envoy (proxy-wasm)"},
    }, separators=(",", ":"), sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": MANIFEST, "digest": digest(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }, separators=(",", ":"), sort_keys=True).encode()
    blobs = [(f"blobs/sha256/{digest(b).split(':')[1]}", b) for b in (config, layer, manifest)]
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)] + sorted(blobs)
    return files, digest(manifest)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wasm", default=str(ROOT / "build" / "gateway_filter.wasm"))
    ap.add_argument("--out", default=str(ROOT / "build" / "gateway-filter.oci.tar"))
    ap.add_argument("--tag", default="0.1.0")
    ap.add_argument("--registry", default="registry.example.com")
    ap.add_argument("--istio-dir", default=str(ROOT / "build" / "istio"))
    ap.add_argument("--envoy-gateway-dir", default=str(ROOT / "build" / "envoy-gateway"))
    args = ap.parse_args()
    wasm = Path(args.wasm).read_bytes()
    files, manifest_digest = build(wasm, args.tag)
    Path(args.out).write_bytes(tar_bytes(files))
    print(f"{args.out}: OCI image layout, tag {args.tag}, manifest {manifest_digest}")
    for source, dest in (("istio", args.istio_dir), ("envoy-gateway", args.envoy_gateway_dir)):
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "envoy" / source).glob("*.yaml")):
            text = src.read_text().replace("REGISTRY", args.registry).replace("DIGEST", manifest_digest.split(":")[1])
            (out / src.name).write_text(text)
    print(f"WasmPlugin url: oci://{args.registry}/gateway-filter@{manifest_digest} (manifests in {args.istio_dir})")
    print(f"EnvoyExtensionPolicy image: {args.registry}/gateway-filter@{manifest_digest} "
          f"(manifests in {args.envoy_gateway_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

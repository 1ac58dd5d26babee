"""`make oci`: the archive is an OCI image layout whose image Istio's fetcher accepts (its last
layer is a tar+gzip holding plugin.wasm), every blob matches its digest, plugin.wasm is the
built module byte for byte, and building twice gives the same digest."""
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile

from harness import ROOT, WASM, require_build


def build(tmp_path, name):
    out = tmp_path / name
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "oci.py"), "--out", str(out), "--tag", "9.9.9"],
                       capture_output=True, text=True, check=True)
    return out, r.stdout


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def blob(files, digest):
    algo, hexd = digest.split(":")
    assert algo == "sha256"
    data = files[f"blobs/sha256/{hexd}"]
    assert hashlib.sha256(data).hexdigest() == hexd, "the blob matches its digest"
    return data


def test_the_archive_is_an_image_istio_accepts(tmp_path):
    require_build()
    out, printed = build(tmp_path, "a.tar")
    files = members(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "9.9.9"
    manifest_bytes = blob(files, entry["digest"])
    assert len(manifest_bytes) == entry["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config = json.loads(blob(files, manifest["config"]["digest"]))
    last = manifest["layers"][-1]
    assert last["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer = blob(files, last["digest"])
    assert len(layer) == last["size"]
    layer_tar = gzip.decompress(layer)
    assert config["rootfs"]["diff_ids"][-1] == "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        names = tar.getnames()
        assert names == ["plugin.wasm"], names
        plugin = tar.extractfile("plugin.wasm").read()
    assert plugin == WASM.read_bytes(), "plugin.wasm is the built module, byte for byte"
    assert plugin[:4] == b"\0asm"
    assert entry["digest"] in printed, "the digest to pin is printed"
    # Reproducible: the same module gives the same archive, hence the same digest.
    again, _ = build(tmp_path, "b.tar")
    assert again.read_bytes() == out.read_bytes()

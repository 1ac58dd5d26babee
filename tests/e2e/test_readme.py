"""Claims of the README that drift with every change, checked against the sources and the
build: the layout's import order (each module imports only the ones listed above it) and the
module size."""
import re
from pathlib import Path

from harness import WASM, require_build

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def layout_order():
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    order = []
    for line in block.splitlines():
        m = re.match(r"^src/(\w+)(?:\.rs|/)", line)
        if m and m.group(1) not in order:
            order.append(m.group(1))
    return order


def test_each_module_imports_only_modules_listed_above_it():
    order = layout_order()
    position = {m: i for i, m in enumerate(order)}
    listed = {p.stem if p.is_file() else p.name for p in (ROOT / "src").iterdir()} - {"lib", "main"}
    assert listed <= set(position), f"modules missing from the README's layout: {listed - set(position)}"
    wrong = []
    for f in (ROOT / "src").rglob("*.rs"):
        rel = f.relative_to(ROOT / "src")
        top = rel.parts[0].removesuffix(".rs")
        if top in ("lib", "main") or rel.name == "tests.rs" or rel.name.endswith("_tests.rs"):
            continue
        code = f.read_text().split("#[cfg(test)]")[0]
        for used in set(re.findall(r"crate::(\w+)", code)):
            if used != top and used in position and position[used] > position[top]:
                wrong.append(f"{rel} uses {used}")
    assert not wrong, wrong


def test_the_module_size_in_the_readme_is_the_built_ones():
    require_build()
    figure = int(re.search(r"`\.wasm`: \*\*([\d,]+) bytes\*\*", README).group(1).replace(",", ""))
    size = WASM.stat().st_size
    assert abs(size - figure) <= figure * 0.05, f"README says {figure} bytes, the build is {size}"


def pinned_paths():
    """(name, host calls in order) of the pinned request paths (src/pipeline/tests.rs)."""
    code = (ROOT / "src" / "pipeline" / "tests.rs").read_text()
    block = code.split("const PINNED_PATHS", 1)[1].split("];", 1)[0]
    out = []
    for entry in re.split(r"\n    \(\n", block)[1:]:
        name = re.search(r'"([^"]+)"', entry).group(1)
        calls = "".join(re.findall(r'"([^"]*)"', entry.split("concat!(", 1)[1]))
        out.append((name, calls))
    return out


def test_the_host_call_figures_in_the_readme_are_the_pinned_ones():
    pinned = pinned_paths()
    assert len(pinned) == 7, pinned
    table = {}
    for line in README.split("Host calls per request (the filter's pinned native test", 1)[1].splitlines():
        m = re.match(r"^\| (.+?) \| (\d+) \| ([a-z_ ]+) \|$", line)
        if m:
            table[m.group(1)] = (int(m.group(2)), m.group(3))
    for name, calls in pinned:
        assert table.get(name) == (len(calls.split()), calls), f"README's row for {name!r} is not the pinned one"
    counts = [len(calls.split()) for _, calls in pinned]
    sentence = README.split("**host calls per request path, pinned**", 1)[1].split("(was", 1)[0]
    assert [int(n) for n in re.findall(r" (\d+)", sentence)] == counts, sentence

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

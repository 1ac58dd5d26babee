"""Reading a wasm module's sections, imports (with their signatures) and exports: what the
module-hygiene and host-table tests check."""

VALTYPE = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64"}


def leb128(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def sections(data):
    assert data[:4] == b"\0asm" and data[4:8] == b"\1\0\0\0", "a wasm module, version 1"
    i = 8
    while i < len(data):
        sid = data[i]
        size, i = leb128(data, i + 1)
        yield sid, data[i:i + size]
        i += size


def _name(body, j):
    n, j = leb128(body, j)
    return body[j:j + n].decode(), j + n


def _imports(body):
    """(module, name, kind, type index or None) of each entry of an import section."""
    count, j = leb128(body, 0)
    for _ in range(count):
        module, j = _name(body, j)
        name, j = _name(body, j)
        kind, j = body[j], j + 1
        index = None
        if kind == 0:
            index, j = leb128(body, j)
        elif kind in (1, 2):  # a table (element type first) or a memory: limits
            if kind == 1:
                j += 1
            flags, j = leb128(body, j)
            _, j = leb128(body, j)
            if flags & 1:
                _, j = leb128(body, j)
        else:  # a global: type and mutability
            j += 2
        yield module, name, kind, index


def names(body, with_module):
    """(module, name, kind) of an import section (`with_module`) or (None, name, kind) of an
    export section."""
    if with_module:
        return [(m, n, k) for m, n, k, _ in _imports(body)]
    count, j = leb128(body, 0)
    out = []
    for _ in range(count):
        name, j = _name(body, j)
        kind, j = body[j], j + 1
        _, j = leb128(body, j)
        out.append((None, name, kind))
    return out


def function_types(body):
    """The type section: each function type as "(params) -> (results)"."""
    count, j = leb128(body, 0)
    out = []
    for _ in range(count):
        j += 1  # 0x60
        n, j = leb128(body, j)
        params = [VALTYPE[x] for x in body[j:j + n]]
        j += n
        n, j = leb128(body, j)
        results = [VALTYPE[x] for x in body[j:j + n]]
        j += n
        out.append(f"({', '.join(params)}) -> ({', '.join(results)})")
    return out


def imported_functions(data):
    """(module, name, signature) of every imported function."""
    parts = dict((sid, body) for sid, body in sections(data) if sid in (1, 2))
    types = function_types(parts.get(1, b"\0"))
    return [(m, n, types[t]) for m, n, kind, t in _imports(parts.get(2, b"\0")) if kind == 0]

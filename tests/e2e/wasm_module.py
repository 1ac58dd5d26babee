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


def names(body, with_module):
    count, j = leb128(body, 0)
    out = []
    for _ in range(count):
        module = None
        if with_module:
            n, j = leb128(body, j)
            module = body[j:j + n].decode()
            j += n
        n, j = leb128(body, j)
        name = body[j:j + n].decode()
        j += n
        kind = body[j]
        j += 1
        if with_module:
            if kind == 0:
                _, j = leb128(body, j)
            elif kind == 1:
                j += 1
                flags = body[j]
                _, j = leb128(body, j + 1)
                if flags & 1:
                    _, j = leb128(body, j)
            elif kind == 2:
                flags = body[j]
                _, j = leb128(body, j + 1)
                if flags & 1:
                    _, j = leb128(body, j)
            else:
                j += 2
        else:
            _, j = leb128(body, j)
        out.append((module, name, kind))
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
    out = []
    body = parts.get(2, b"\0")
    count, j = leb128(body, 0)
    for _ in range(count):
        n, j = leb128(body, j)
        module = body[j:j + n].decode()
        j += n
        n, j = leb128(body, j)
        name = body[j:j + n].decode()
        j += n
        kind, j = body[j], j + 1
        if kind == 0:
            t, j = leb128(body, j)
            out.append((module, name, types[t]))
        elif kind in (1, 2):
            if kind == 1:
                j += 1
            flags, j = leb128(body, j)
            _, j = leb128(body, j)
            if flags & 1:
                _, j = leb128(body, j)
        else:
            j += 2
    return out

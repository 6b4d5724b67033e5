#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets to tests/fuzz/corpus/<target>/.

A handful of small valid and invalid inputs per target, built by hand from
the Avro binary encoding, so that the fuzzer starts from inputs that reach
the body decoder, the depth walk and the JSON conversion instead of having
to find the framing first. Rerun it after changing a target's input layout
(the schema order in src/lib.rs); the files it writes are committed.
"""

import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# wire_decoder: the first byte picks, in src/lib.rs `wire_fixture` order.
V1, V2, RECURSIVE, WIDE, DEEP, WRONG_TYPE, UNKNOWN, RAW = range(8)
# Ids the file registry assigns, in registration order.
ID_V2 = 2
# depth_walker: the first byte picks, in src/lib.rs `walker_schemas` order.
W_RECURSIVE, W_REQUEST, W_NODE, W_TREE, W_MUTUAL, W_WIDE, W_DEEP = range(7)


def long(n):
    """Avro long: zig-zag, then a little-endian base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string(s):
    b = s.encode() if isinstance(s, str) else s
    return long(len(b)) + b


def request(content=b"hello atoms", created_at=None, v1=False, metadata=(("lang", "en"),)):
    body = string("text/plain") + string(content)
    body += (long(len(metadata)) + b"".join(string(k) + string(v) for k, v in metadata) if metadata else b"") + long(0)
    body += string("fuzz") + string("corr-1")
    if not v1:
        body += long(0) if created_at is None else long(1) + long(created_at)
    return body


def nodes(levels):
    """`levels` linked Nodes: branch 1 (another Node) then branch 0 (null)."""
    return long(1) * (levels - 1) + long(0)


def wide_extras(grid=long(2) + long(1) + long(0) + long(0) + long(0)):
    """The writer-only fields of `wide`; `grid` defaults to [[null], []]."""
    return b"".join([
        long(3) + long(0),  # flags: three nulls
        grid,
        long(1) + string("k") + long(2) + struct.pack("<dd", 0.5, -1.0) + long(0) + long(0),  # scores
        long(2),  # kind: C
        b"\x01\x02\x03\x04",  # digest
        struct.pack("<f", 1.5),  # ratio
        b"\x01",  # ok
        long(-7),  # count
        long(4) + long(99),  # choice: Inner {x: 99}
        long(19000),  # day
        string("67e55044-10b1-426f-9247-bb680e5fe0c8"),  # uid
        string(b"\x00\x04\xd2"),  # amount: 12.34 in 3 bytes
        bytes(12),  # span
    ])


def grid_past_the_cap():
    """40 inner arrays of `null`s, each claiming all the values one
    collection may hold (64 MiB / 56 bytes): 2.5 GB if decoded without the
    walk's item budget (src/avro/decoder.rs, "Bounded items")."""
    full = 64 * 1024 * 1024 // 56
    return long(40) + (long(full) + long(0)) * 40 + long(0)


def deep_extras():
    # L1 > ... > L10 hold only the innermost map.
    return long(1) + string("depth") + string("10") + long(0)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def framed(schema_id, body):
    return b"\x00" + struct.pack(">I", schema_id) + body


def main():
    shutil.rmtree(os.path.join(HERE, "corpus"), ignore_errors=True)

    w = "wire_decoder"
    write(w, "v2", bytes([V2]) + request())
    write(w, "v2-created-at", bytes([V2]) + request(created_at=1_700_000_000_123, metadata=()))
    write(w, "v2-binary-content", bytes([V2]) + request(content=b"\xff\xfe\x00", metadata=(("a", ""), ("b", "\u00e9"))))
    write(w, "v1", bytes([V1]) + request(v1=True))
    write(w, "recursive-3", bytes([RECURSIVE]) + request() + nodes(3))
    write(w, "recursive-20", bytes([RECURSIVE]) + request() + nodes(20))
    write(w, "recursive-too-deep", bytes([RECURSIVE]) + request() + nodes(80))
    write(w, "wide", bytes([WIDE]) + request() + wide_extras())
    write(w, "wide-grid-past-the-cap", bytes([WIDE]) + request() + wide_extras(grid=grid_past_the_cap()))
    write(w, "deep", bytes([DEEP]) + request() + deep_extras())
    write(w, "wrong-type", bytes([WRONG_TYPE]) + request())
    write(w, "unknown-id", bytes([UNKNOWN]) + request())
    write(w, "v2-truncated", bytes([V2]) + request()[:9])
    write(w, "v2-trailing", bytes([V2]) + request() + b"\xde\xad")
    write(w, "raw-framed", bytes([RAW]) + framed(ID_V2, request()))
    write(w, "raw-bad-magic", bytes([RAW]) + b"\x01\x00\x00\x00\x02" + request())
    write(w, "raw-short", bytes([RAW]) + b"\x00\x00\x01")

    d = "depth_walker"
    write(d, "recursive-request", bytes([W_RECURSIVE]) + request() + nodes(5))
    write(d, "request", bytes([W_REQUEST]) + request(created_at=5))
    write(d, "node-4", bytes([W_NODE]) + nodes(4))
    write(d, "node-too-deep", bytes([W_NODE]) + nodes(70))
    tree_leaf = long(0) + long(0) + string("x")
    write(d, "tree", bytes([W_TREE]) + long(1) + tree_leaf + long(0) + long(1) + string("t") + long(1) + tree_leaf + long(0) + string("root"))
    write(d, "tree-negative-block", bytes([W_TREE]) + long(-1) + long(len(tree_leaf)) + tree_leaf + long(0) + long(0) + string(""))
    mutual_leaf_b = long(0) + long(1)  # a: null, e: Y
    write(d, "mutual", bytes([W_MUTUAL]) + long(1) + mutual_leaf_b + b"fx" + long(0) + b"gy")
    write(d, "wide", bytes([W_WIDE]) + request() + wide_extras())
    write(d, "deep", bytes([W_DEEP]) + request() + deep_extras())
    write(d, "garbage", bytes([W_TREE]) + bytes(range(0xF0, 0x100)))

    j = "json_bridge"
    write(j, "request", json.dumps({"content_type": "text/plain", "content": "Kafka partitions are the unit of parallelism.",
                                     "metadata": {"lang": "en", "seq": "0"}, "source_system": "wiki", "correlation_id": "demo-000"}).encode())
    write(j, "request-bytes", json.dumps({"content_type": "application/octet-stream", "content": [0, 255, 128],
                                           "source_system": "s", "correlation_id": "c", "created_at_ms": 1700000000000}).encode())
    write(j, "request-null-created", b'{"content_type":"text/plain","content":"","source_system":"","correlation_id":"","created_at_ms":null}\r\n')
    write(j, "request-unknown-field", b'{"content_type":"text/plain","content":"x","source_system":"s","correlation_id":"c","extra":1}')
    write(j, "request-wrong-type", b'{"content_type":7,"content":"x","source_system":"s","correlation_id":"c"}')
    write(j, "syntax-error", b'{"content_type": ')
    write(j, "all-types", json.dumps({
        "n": 3, "b": True, "l": -9007199254740993, "f": 0.25, "d": 1e300, "by": [1, 2, 250], "s": "\u00e9\n",
        "fx": "xyz", "e": "Y", "a": [None, 5, "five"], "m": {"k": [1.5, -0.0]},
        "r": {"next": {"v": "inner"}, "v": "outer"}, "date": 19000, "tm": 1000, "tu": 5, "ts": -5, "lts": 7,
        "uid": "67e55044-10b1-426f-9247-bb680e5fe0c8", "dec": "-12.345", "decf": 123.45, "big": "3.14159e-2",
        "dur": {"months": 1, "days": 2, "millis": 3},
    }).encode())
    write(j, "all-types-minimal", json.dumps({"dec": "0", "decf": "0", "big": "0", "dur": {}}).encode())
    # Exponents that would make rescaling compute a power of ten gigabytes
    # long (src/avro/json.rs, `decimal`; found by this target).
    write(j, "decimal-huge-exponent", json.dumps({"dec": "5E3193557124355224006", "decf": "-1e-999999999999", "big": "0", "dur": {}}).encode())


if __name__ == "__main__":
    main()

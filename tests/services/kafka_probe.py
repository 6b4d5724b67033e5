#!/usr/bin/env python3
"""Readiness probe for the test Kafka broker (used by tests/services.sh).

Speaks the Kafka wire protocol directly (standard library only, no client to
install): sends ApiVersions v0, then Metadata v1 for all topics, and checks
that the broker answers without error and advertises the expected host:port.
Metadata goes through the storage engine, so with S3 storage this also proves
that the broker can reach its bucket.

usage: kafka_probe.py HOST PORT [TIMEOUT_SECONDS]
exit 0 when ready; 1 with a reason on stderr otherwise.
"""
import socket
import struct
import sys


def request(sock, api_key, api_version, correlation_id, body=b""):
    client_id = b"hartonomous-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    response = recv_exact(sock, size)
    (got_id,) = struct.unpack_from(">i", response, 0)
    if got_id != correlation_id:
        raise RuntimeError(f"correlation id {got_id} != {correlation_id}")
    return response[4:]


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("connection closed by broker")
        buf += chunk
    return buf


def read_string(buf, pos):
    (length,) = struct.unpack_from(">h", buf, pos)
    pos += 2
    if length < 0:
        return None, pos
    return buf[pos:pos + length].decode(), pos + length


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        # ApiVersions v0: error_code, [api_key, min, max]
        body = request(sock, 18, 0, 1)
        (error,) = struct.unpack_from(">h", body, 0)
        if error != 0:
            raise RuntimeError(f"ApiVersions error code {error}")
        # Metadata v1, topics = null (all): brokers [node_id, host, port, rack], ...
        body = request(sock, 3, 1, 2, struct.pack(">i", -1))
        (count,) = struct.unpack_from(">i", body, 0)
        pos, brokers = 4, []
        for _ in range(count):
            pos += 4  # node_id
            broker_host, pos = read_string(body, pos)
            (broker_port,) = struct.unpack_from(">i", body, pos)
            pos += 4
            _rack, pos = read_string(body, pos)
            brokers.append((broker_host, broker_port))
        if (host, port) not in brokers:
            raise RuntimeError(f"broker advertises {brokers}, expected {host}:{port}")
    print(f"kafka api ok at {host}:{port}, advertised {brokers}")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        print(f"kafka not ready: {exc}", file=sys.stderr)
        sys.exit(1)

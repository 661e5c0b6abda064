#!/usr/bin/env python3
"""Waits until a Kafka broker answers a Metadata request listing at least N brokers.

    python3 scripts/kafka-ready.py 127.0.0.1:9092 [N_BROKERS [TIMEOUT_SECONDS]]

An open port is not enough: a KRaft broker accepts connections before it has joined the
cluster. Metadata v4 (the oldest version Kafka 4 still serves), standard library only, so that
it runs before any Kafka client is installed. Exit 0 when ready, 1 on timeout (with the last
reason on stderr).
"""
import socket
import struct
import sys
import time


def brokers_listed(host: str, port: int) -> int:
    client_id = b"posthorn-ready"
    # Request header v1 (api_key 3 = Metadata, version 4, correlation id, client id), then
    # Metadata v4: topics = null (all), allow_auto_topic_creation = false.
    body = struct.pack(">hhih", 3, 4, 1, len(client_id)) + client_id
    body += struct.pack(">i?", -1, False)
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", read_exactly(sock, 4))[0]
        response = read_exactly(sock, size)
    # correlation id (4), throttle_time_ms (4), then the brokers array's length.
    return struct.unpack(">i", response[8:12])[0]


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data


def main() -> int:
    host, port = sys.argv[1].rsplit(":", 1)
    want = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    deadline = time.monotonic() + (float(sys.argv[3]) if len(sys.argv) > 3 else 60)
    reason = "no attempt made"
    while time.monotonic() < deadline:
        try:
            n = brokers_listed(host, int(port))
            if n >= want:
                return 0
            reason = f"{n} of {want} brokers listed"
        except (OSError, struct.error) as err:
            reason = str(err) or type(err).__name__
        time.sleep(0.2)
    print(f"kafka-ready: {sys.argv[1]} not ready: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

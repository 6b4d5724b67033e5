"""A producer no one on the Hartonomous team wrote: the standard Confluent
Python client (confluent-kafka) with its own AvroSerializer, registering the
schema in a Confluent-compatible registry, as an upstream team would.

Usage: python3 confluent_producer.py BOOTSTRAP REGISTRY_URL TOPIC SCHEMA_FILE REQUESTS_JSONL BAD_JSONL SLICE PAUSE_S

REQUESTS_JSONL: one request per line (the schema's fields; `content` as text).
BAD_JSONL: one malformed record per line, {"key": ..., "hex": ...}: raw bytes
sent without the serializer (a producer bug or a foreign producer). Records
go out in slices of SLICE, PAUSE_S seconds apart, requests and malformed
records interleaved in file order; keys are the correlation ids. Prints
`produced N` at the end and exits non-zero if any delivery failed.
"""

import json
import sys
import time

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main() -> None:
    bootstrap, registry_url, topic, schema_file, requests_file, bad_file, slice_n, pause = sys.argv[1:9]
    slice_n, pause = int(slice_n), float(pause)
    schema_str = open(schema_file).read()
    registry = SchemaRegistryClient({"url": registry_url})
    serializer = AvroSerializer(registry, schema_str, conf={"auto.register.schemas": True})
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.timeout.ms": 300000,
        "compression.type": "zstd",
    })
    failures = []

    def delivered(err, msg):
        if err is not None:
            failures.append(str(err))

    records = []
    for line in open(requests_file):
        if line.strip():
            req = json.loads(line)
            req["content"] = req["content"].encode()
            value = serializer(req, SerializationContext(topic, MessageField.VALUE))
            records.append((req["correlation_id"].encode(), value))
    bad = [json.loads(line) for line in open(bad_file) if line.strip()]
    # Interleave the malformed records through the stream.
    for k, b in enumerate(bad):
        at = (k * 997 + 13) % (len(records) + 1)
        records.insert(at, (b["key"].encode(), bytes.fromhex(b["hex"])))
    sent = 0
    for start in range(0, len(records), slice_n):
        for key, value in records[start:start + slice_n]:
            while True:
                try:
                    producer.produce(topic, key=key, value=value, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            sent += 1
        producer.flush(300)
        if pause:
            time.sleep(pause)
    remaining = producer.flush(300)
    if failures or remaining:
        print(f"delivery failed: {remaining} undelivered, {failures[:5]}", file=sys.stderr)
        sys.exit(1)
    print(f"produced {sent}")


if __name__ == "__main__":
    main()

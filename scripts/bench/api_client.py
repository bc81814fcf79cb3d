#!/usr/bin/env python3
"""The API benchmark through the Python client (`sandboxd`, proto/python).

    python3 scripts/bench/api_client.py IMAGE RUNS

Prints one JSON object per metric, one per line: name, runs, median, p99 (ms; MB/s for throughput).
The socket comes from SANDBOXD_SOCKET.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "python"))
from sandboxd import Sandbox  # noqa: E402


def stats(name, unit, samples):
    s = sorted(samples)
    pct = lambda p: s[min(len(s) - 1, round((len(s) - 1) * p))]  # noqa: E731
    print(json.dumps({"name": name, "unit": unit, "runs": len(s), "median": pct(0.5), "p99": pct(0.99)}), flush=True)


def main():
    image, runs = sys.argv[1], int(sys.argv[2])
    ms = lambda t: (time.perf_counter() - t) * 1000  # noqa: E731

    samples = []
    for _ in range(max(runs // 10, 5)):
        t = time.perf_counter()
        sb = Sandbox.run(container_image=image)
        sb.exec(["true"]).result()
        samples.append(ms(t))
        Sandbox.delete(sb.sandbox_id, missing_ok=True)
    stats("create -> first exec result", "ms", samples)

    with Sandbox.run(container_image=image) as sb:
        sb.wait()
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            r = sb.exec(["true"]).result()
            samples.append(ms(t))
            assert r.returncode == 0
        stats("exec round trip", "ms", samples)

        for label, size, n in (("1 MiB", 1 << 20, max(runs // 4, 10)), ("100 MiB", 100 << 20, 5)):
            data = os.urandom(size)
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                sb.write_file("/tmp/bench.bin", data).result()
                back = sb.read_file("/tmp/bench.bin").result()
                samples.append(ms(t))
                assert back == data
            stats(f"file write + read {label}", "ms", samples)

        samples = []
        for _ in range(3):
            t = time.perf_counter()
            # Every byte crosses the socket into the client; result() keeps the first 16 MiB.
            r = sb.exec(["head", "-c", "1073741824", "/dev/zero"]).result()
            secs = time.perf_counter() - t
            samples.append((1 << 30) / secs / 1e6)
            assert r.returncode == 0 and len(r.stdout_bytes) > 0
        stats("exec stdout streaming", "MB/s", samples)


if __name__ == "__main__":
    main()

"""A client for a cluster on network-namespace hosts, run on one of them (the test itself
stays in the root namespace, which has no route to them).

``python cluster_client.py HTTP GRPC MODEL...``: waits until the gateway serves each model
on a different slot, checks every model over HTTP and gRPC, then keeps a client thread per
model and protocol busy and prints ``loaded``. When its stdin says ``killed`` it waits until
every model is served again, checks them all once more and prints one JSON line: the outcome
counts, the seconds from ``killed`` to serving again and the placements before and after.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def infer(protocol: str, url: str, model: str, timeout: float = 20) -> None:
    data = np.arange(4, dtype=np.float32)
    if protocol == "http":
        client: Any = httpclient.InferenceServerClient(url, network_timeout=timeout)
        tensor: Any = httpclient.InferInput("INPUT0", [4], "FP32")
    else:
        client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(data)
    try:
        kwargs = {} if protocol == "http" else {"client_timeout": timeout}
        out = client.infer(model, [tensor], **kwargs).as_numpy("OUTPUT0")
        if not np.array_equal(out, data):
            raise AssertionError(f"{model}: {out} != {data}")
    finally:
        client.close()


def serving(http: str) -> dict[str, list[str]]:
    try:
        with urllib.request.urlopen(f"http://{http}/v2/gateway", timeout=5) as resp:
            status = json.loads(resp.read())
    except OSError:
        return {}
    return {n["name"]: n["ready_models"] for n in status["nodes"] if n["up"]}


def wait(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out; serving: {serving(sys.argv[1])}")
        time.sleep(0.05)


def main() -> None:
    http, grpc, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    wait(lambda: sorted(len(m) for m in serving(http).values()) == [1] * len(models), 180)
    before = serving(http)
    urls = {"http": http, "grpc": grpc}
    for model in models:
        for protocol, url in urls.items():
            infer(protocol, url, model)
    outcomes: dict[str, int] = {"ok": 0, "unavailable": 0, "other": 0}
    stop = threading.Event()

    def load(protocol: str, model: str) -> None:
        while not stop.is_set():
            try:
                infer(protocol, urls[protocol], model)
                outcomes["ok"] += 1
            except InferenceServerException as exc:
                status = str(exc.status())
                unavailable = "503" in status or "UNAVAILABLE" in status
                outcomes["unavailable" if unavailable else "other"] += 1
                if not unavailable:
                    print(f"unexpected: {status} {exc.message()}", file=sys.stderr)

    threads = [threading.Thread(target=load, args=(p, m)) for p in urls for m in models]
    for thread in threads:
        thread.start()
    wait(lambda: outcomes["ok"] >= 8, 60)
    print("loaded", flush=True)
    assert sys.stdin.readline().strip() == "killed"
    killed = time.monotonic()
    wait(lambda: [len(m) for m in serving(http).values()] == [len(models)], 120)
    for model in models:
        for protocol, url in urls.items():
            infer(protocol, url, model)
    recovered = time.monotonic() - killed
    stop.set()
    for thread in threads:
        thread.join(60)
    hung = sum(t.is_alive() for t in threads)
    result = {**outcomes, "hung": hung, "recovered_s": recovered, "before": before,
              "after": serving(http)}  # fmt: skip
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

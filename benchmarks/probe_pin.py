"""Probe (not run yet): the cost of page-locking a fresh 720p decode result (0.9 GB) against a
cached one, and whether pinning it on a background thread stalls GPU work the main thread queued.
  python benchmarks/probe_pin.py"""

import json
import threading
import time

import torch

N = 81 * 720 * 1280 * 3  # the float32 frames of a 720p x 81 decode
R = {"device": torch.cuda.get_device_name()}
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)


def pin():
    t = time.perf_counter()
    b = torch.empty(N, dtype=torch.float32, pin_memory=True)
    return b, time.perf_counter() - t


def work(n=400):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        x @ x
    torch.cuda.synchronize()
    return time.perf_counter() - t


a, R["fresh_pin_s"] = pin()
del a
a, R["cached_pin_s"] = pin()  # the freed block back from torch's host cache
b, R["second_fresh_pin_s"] = pin()  # a still held: fresh pages again
work(20)
R["work_alone_s"] = [work() for _ in range(2)]
res = {}
th = threading.Thread(target=lambda: res.update(zip(("b", "t"), pin())))
th.start()
R["work_with_background_pin_s"] = work()
th.join()
R["background_pin_s"] = res["t"]
print(json.dumps(R))

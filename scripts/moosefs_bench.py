#!/usr/bin/env python3
"""The phases of `dfs-tui --cmd bench` on a MooseFS mount (see moosefs-side-by-side.sh).

Usage: moosefs_bench.py MOUNT [FILES] [--no-large]. Small files are written without fsync,
as MooseFS itself does not fsync by default; reads follow a page-cache drop."""
import os, sys, time, threading, subprocess

mnt = sys.argv[1]
nfiles = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
data = os.urandom(4096)

def drop():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")

def timed(n, conc, op):
    lat = []
    lock = threading.Lock()
    idx = iter(range(n))
    def worker():
        mine = []
        while True:
            with lock:
                i = next(idx, None)
            if i is None:
                break
            t = time.perf_counter()
            op(i)
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(conc)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    secs = time.perf_counter() - t0
    lat.sort()
    return n / secs, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3

def large(goal):
    d = os.path.join(mnt, f"g{goal}")
    os.makedirs(d, exist_ok=True)
    subprocess.run(["mfssetgoal", str(goal), d], check=True, capture_output=True)
    p = os.path.join(d, "big")
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={p}", "bs=1M", "count=1024", "conv=fsync"], check=True, capture_output=True)
    w = 1024 / (time.perf_counter() - t)
    time.sleep(2)
    drop()
    t = time.perf_counter()
    subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=1M"], check=True, capture_output=True)
    r = 1024 / (time.perf_counter() - t)
    os.unlink(p)
    print(f"1 GiB, goal {goal}: write {w:.0f} MiB/s, cold read {r:.0f} MiB/s", flush=True)

def small(conc):
    d = os.path.join(mnt, "g3", f"small{conc}")
    os.makedirs(d, exist_ok=True)
    path = lambda i: os.path.join(d, f"f{i}")
    def create(i):
        with open(path(i), "wb") as f:
            f.write(data)
    def read(i):
        with open(path(i), "rb") as f:
            assert len(f.read()) == 4096
    def stat(i):
        os.stat(path(i))
    def delete(i):
        os.unlink(path(i))
    for name, op in [("create", create), ("read", read), ("stat", stat), ("delete", delete)]:
        if name == "read":
            drop()
        ops, p50, p99 = timed(nfiles, conc, op)
        print(f"{name:8} {conc:3} {ops:9.0f} ops/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms", flush=True)

if "--no-large" not in sys.argv:
    large(1)
    large(3)
for c in (1, 16):
    small(c)

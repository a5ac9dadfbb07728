"""Memory of a real ``facegallery serve`` under hostile images (issue 8, memory budget).

A 10900x10900 all-black PNG is ~115 KB on the wire and 119 MP (under the 120 MP limit) once
decoded. For each server setting this starts ``facegallery serve``, warms it up with one small
Identify, then sends ``--calls`` concurrent Identify calls with that PNG, sampling the server's RSS
from /proc every 10 ms, and reads RSS again ``--settle`` seconds after the calls. Default settings
compared: ``--memory-budget 0`` (no budget, the baseline), the default budget (25 % of memory) and a
tight 1500 MB budget (calls queue, then RESOURCE_EXHAUSTED)::

    python bench/hostile_memory.py                 # the server runs
    python bench/hostile_memory.py --factor        # the per-megapixel factor of memory_budget.py

``--factor`` measures, in a fresh process per size, one ``FacePipeline.analyze`` of a flat PNG/JPEG
after a warm-up call: peak RSS over the RSS before the call, per decoded megapixel, with reduced
decoding off and on.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hostile_png(side: int = 10900, mode: str = "L") -> bytes:
    """An all-black PNG of side x side pixels, grey ("L", ~115 KB for 10900 px, as in issue 8) or
    "RGB" (~340 KB), compressed row by row (no full-size buffer)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    channels = {"L": 1, "RGB": 3}[mode]
    row = b"\x00" * (1 + channels * side)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, {"L": 0, "RGB": 2}[mode], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _model_dir() -> Path:
    cache = sorted((ROOT / "tests" / ".model-cache").glob("dlib_resnet_v1-*"), key=lambda p: p.stat().st_mtime)
    if cache:
        return cache[-1]
    from facegallery.export.dlib.default_model import ensure_default_model

    return ensure_default_model()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(extra: list[str], data: bytes, calls: int, settle: float, model_dir: Path) -> dict:
    from PIL import Image

    from facegallery.client import GalleryClient

    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).parent / "facegallery"), "serve", "--data-dir", tmp, "--port", str(port),
               "--host", "127.0.0.1", "--model-dir", str(model_dir), "--log-level", "WARNING", *extra]  # fmt: skip
        server = subprocess.Popen(cmd)
        try:
            client = GalleryClient(f"127.0.0.1:{port}", timeout=120, retries=0)
            client.wait_ready(120)
            try:
                client.create_gallery("bench")
            except Exception:
                pass
            small = io.BytesIO()
            Image.new("RGB", (1000, 800), (120, 110, 100)).save(small, "JPEG")
            _call(client, small.getvalue())
            time.sleep(0.5)
            start = _status(server.pid, "VmRSS")
            peak = [start]
            done = threading.Event()

            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], _status(server.pid, "VmRSS"))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(calls) as pool:
                outcomes = list(pool.map(lambda _: _call(client, data), range(calls)))
            elapsed = time.perf_counter() - started
            time.sleep(settle)
            done.set()
            sampler.join()
            after = _status(server.pid, "VmRSS")
            client.close()
            return {"start": start, "peak": peak[0], "after": after, "outcomes": outcomes, "seconds": elapsed}
        finally:
            server.terminate()
            server.wait(30)


def _call(client, data: bytes) -> str:
    try:
        client.identify(data, gallery="bench")
        return "OK"
    except Exception as exc:  # the status name is the outcome
        code = getattr(exc, "code", None)
        return getattr(code, "name", type(exc).__name__)


def measure_factor(side: int, fmt: str, reduce_above: int) -> str:
    """One analyze in this process: peak RSS over start, per MP (run in a fresh process)."""
    from PIL import Image

    from facegallery.server.contract.process_memory import return_memory_to_os
    from facegallery.server.face.pipeline import FacePipeline, PipelineConfig

    pipeline = FacePipeline.from_model_dir(_model_dir(), PipelineConfig(reduce_above_pixels=reduce_above, memory_budget_bytes=0))

    def encoded(side: int, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (90, 80, 70)).save(buf, fmt, **({"quality": 80} if fmt == "JPEG" else {}))
        return buf.getvalue()

    warm = encoded(1100, "JPEG")
    pipeline.analyze(warm)
    pipeline.analyze(warm)
    data = encoded(side, fmt)
    return_memory_to_os()
    pid = os.getpid()
    start = _status(pid, "VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    pipeline.analyze(data)
    peak = _status(pid, "VmHWM") - start
    mp = side * side / 1e6
    return f"{fmt:4} {side:5}px {mp:6.1f} MP  reduce_above={reduce_above:>10}  peak {peak / 1e6:6.0f} MB  {peak / 1e6 / mp:5.2f} MB/MP"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", action="store_true", help="measure the per-MP factor in-process instead")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after the calls before RSS is read again")
    parser.add_argument("--side", type=int, default=10900)
    parser.add_argument("--mode", choices=["L", "RGB"], default="L", help="grey (issue 8's 115 KB file) or RGB")
    parser.add_argument("--budgets", default="0,default,1500", help="comma-separated --memory-budget values (MB; default = unset)")
    parser.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(measure_factor(int(args._one[0]), args._one[1], int(args._one[2])), flush=True)
        return
    if args.factor:
        for reduce_above in (0, 24_000_000):
            for fmt in ("PNG", "JPEG"):
                for side in (2000, 4000, 7000, 10900):
                    subprocess.run([sys.executable, __file__, "--_one", str(side), fmt, str(reduce_above)], check=True)
        return
    data = hostile_png(args.side, args.mode)
    print(f"hostile PNG: {args.side}x{args.side} {args.mode}, {len(data) / 1024:.0f} KB, {args.calls} concurrent Identify calls")
    model_dir = _model_dir()
    for budget in args.budgets.split(","):
        extra = [] if budget == "default" else ["--memory-budget", budget]
        r = run_server(extra, data, args.calls, args.settle, model_dir)
        counts = {o: r["outcomes"].count(o) for o in sorted(set(r["outcomes"]))}
        print(
            f"--memory-budget {budget:>7}: RSS start {r['start'] / 1e6:5.0f} MB, peak {r['peak'] / 1e6:5.0f} MB "
            f"(+{(r['peak'] - r['start']) / 1e6:.0f}), {args.settle:.0f} s after {r['after'] / 1e6:5.0f} MB "
            f"(+{(r['after'] - r['start']) / 1e6:.0f}); {r['seconds']:.1f} s; outcomes {counts}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Photos/s of one BulkEnroll stream (what ``facegallery import`` does) against the old one-item-at-a-time path.

Both run in the same process run, in rounds that alternate them (so both see the same machine
load), each round into fresh galleries, on real photos of ``../shared/faces`` (LFW, Yale and ORL
files, one identity per folder; sorted paths, every k-th):

* **old**: the server as it was: onnxruntime runs on one thread per core (``PipelineConfig(
  intra_op_threads=0)``), the batching embedder waits 5 ms for more chips, and one item at a time: the client sends an item only after the result
  of the previous one, so the server never holds two (what ``BulkEnroll`` did with any client);
* **new**: the default server, with ``GalleryClient.bulk_enroll`` streaming every item (the
  server analyses up to ``bulk_enroll_window`` of them at once).

Both servers are the real one (``create_server``, the default model, batching embedder,
interceptors), in this process; the client runs in the same process.

    python bench/bulk_enroll.py [--quick] [--photos 48] [--rounds 3] [--model-dir DIR]

Run ``uptime`` first: other load lowers both rates, the ratio much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FACES_DIR = SHARED / "faces"
SOURCES = ("lfw", "yale", "orl")


def load_photos(count: int) -> list[tuple[str, bytes]]:
    """``count`` (identity_id, photo bytes), spread over :data:`SOURCES`."""
    per_source = -(-count // len(SOURCES))
    photos = []
    for source in SOURCES:
        files = sorted(p for p in (FACES_DIR / source).rglob("*") if p.is_file())
        step = max(1, len(files) // per_source)
        photos += [(f"{source}-{p.parent.name}"[:100], p.read_bytes()) for p in files[::step][:per_source]]
    return photos[:count]


def old_path(port: int, gallery: str, photos: list[tuple[str, bytes]]) -> float:
    """Photos/s of one BulkEnroll stream fed one item at a time (the next after the previous result)."""
    import grpc

    from facegallery.v1 import gallery_service_pb2 as pb
    from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

    answered = threading.Semaphore(0)

    def requests():
        for i, (identity_id, data) in enumerate(photos):
            if i:
                answered.acquire()  # the previous item's result is in
            yield pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery=gallery, identity_id=identity_id, image=pb.Image(data=data)))

    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = pb_grpc.GalleryServiceStub(channel)
        began = time.perf_counter()
        ok = 0
        for response in stub.BulkEnroll(requests(), timeout=3600):
            ok += response.HasField("response")
            answered.release()
        elapsed = time.perf_counter() - began
    _check(ok, len(photos), "old")
    return len(photos) / elapsed


def new_path(port: int, gallery: str, photos: list[tuple[str, bytes]]) -> float:
    """Photos/s of ``GalleryClient.bulk_enroll`` over every photo."""
    from facegallery.client import EnrollItem, GalleryClient

    with GalleryClient(f"localhost:{port}", gallery=gallery) as client:
        began = time.perf_counter()
        results = list(client.bulk_enroll((EnrollItem(identity_id, image=data) for identity_id, data in photos), timeout=3600))
        elapsed = time.perf_counter() - began
    assert [r.index for r in results] == list(range(len(photos))), "results out of order"
    _check(sum(r.ok for r in results), len(photos), "new")
    return len(photos) / elapsed


def _check(ok: int, total: int, what: str) -> None:
    if ok < total * 0.9:  # a few photos may have no detectable face; far fewer means a broken path
        raise SystemExit(f"{what} path enrolled only {ok} of {total} photos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="model directory (default: the default dlib model, converted on first use)")
    parser.add_argument("--photos", type=int, default=48, help="photos per stream")
    parser.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds")
    parser.add_argument("--quick", action="store_true", help="1 round of 16 photos (a smoke run, about 1 minute)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.photos = 1, 16

    from facegallery.export.dlib.default_model import ensure_default_model
    from facegallery.server.face.pipeline import PipelineConfig
    from facegallery.server.service.app import ServerConfig, create_server

    model_dir = ensure_default_model(args.model_dir)
    photos = load_photos(args.photos)
    load = os.getloadavg()
    print(f"uptime: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (load averages), {os.cpu_count()} cores")
    print(f"{len(photos)} photos ({statistics.fmean(len(d) for _, d in photos) / 1e3:.0f} KB each) from {', '.join(SOURCES)}; model {model_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(port=0, model_dir=model_dir, snapshot_interval_s=None)
        old = create_server(ServerConfig(data_dir=Path(tmp) / "old", pipeline=PipelineConfig(intra_op_threads=0), batch_max_delay_ms=5.0, **base))
        new = create_server(ServerConfig(data_dir=Path(tmp) / "new", **base))
        try:
            for running in (old, new):  # warm-up: first runs of the sessions
                running.manager.create_gallery("warm")
                new_path(running.port, "warm", photos[:2])
            pairs = []
            for i in range(args.rounds):
                old.manager.create_gallery(f"r{i}")
                new.manager.create_gallery(f"r{i}")
                before = old_path(old.port, f"r{i}", photos)
                after = new_path(new.port, f"r{i}", photos)
                pairs.append((before, after))
                print(f"  round {i + 1}: old {before:6.2f} photos/s   new {after:6.2f} photos/s   ratio {after / before:5.2f}")
        finally:
            new.stop(1.0)
            old.stop(1.0)
    ratio = statistics.median(a / b for b, a in pairs)
    print(
        f"bulk enroll: new {statistics.median(a for _, a in pairs):.2f} photos/s, old {statistics.median(b for b, _ in pairs):.2f} photos/s, "
        f"ratio {ratio:.2f} (median of {len(pairs)} rounds)"
    )


if __name__ == "__main__":
    main()

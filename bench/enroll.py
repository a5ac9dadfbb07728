"""Enrollment and search latency of the gallery server with durable (fsynced) writes.

Embedding-only enrollment, so the numbers are the server's own cost (gRPC + SQLite commit with
``synchronous=FULL`` + FAISS add), not the face pipeline's. Prints, for a gallery growing to
``--n`` templates: store commit, in-process ``GalleryManager.enroll`` and gRPC ``Enroll``
latency (ms, mean ± std after warm-up, p50/p99), ``IdentifyEmbedding`` latency at the final
size, and the throughput of ``--threads`` concurrent enrolling clients.

    python bench/enroll.py [--n 2000] [--threads 4] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from facegallery.server.gallery.store import NewTemplate
from facegallery.server.service.app import ServerConfig, create_server
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

WARMUP = 20


def summary(name: str, seconds: list[float]) -> str:
    ms = np.asarray(seconds[WARMUP:]) * 1e3
    return f"{name:<28} {ms.mean():7.3f} ± {ms.std():6.3f} ms   p50 {np.percentile(ms, 50):7.3f}   p99 {np.percentile(ms, 99):7.3f}   (n={len(ms)})"


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="templates enrolled per measurement")
    parser.add_argument("--threads", type=int, default=4, help="concurrent enrolling clients")
    parser.add_argument("--model-dir", type=Path, default=None, help="model directory (default: the default model)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(data_dir=Path(tmp), port=0, model_dir=args.model_dir, snapshot_interval_s=None, max_workers=args.threads + 4)
        running = create_server(config)
        port, manager = running.port, running.manager
        d = manager.model.embedding_dim
        try:
            manager.create_gallery("store")
            store_times = [timed(manager.store.add_templates, "store", [NewTemplate(f"s{i % 500}", rng.standard_normal(d))]) for i in range(args.n)]
            manager.create_gallery("manager")
            manager_times = [timed(manager.enroll, "manager", f"m{i % 500}", embedding=rng.standard_normal(d)) for i in range(args.n)]
            with grpc.insecure_channel(f"localhost:{port}") as channel:
                stub = pb_grpc.GalleryServiceStub(channel)
                grpc_times = [
                    timed(stub.Enroll, pb.EnrollRequest(identity_id=f"g{i % 500}", embedding=pb.Embedding(values=rng.standard_normal(d).tolist())))
                    for i in range(args.n)
                ]
                search_times = [
                    timed(stub.IdentifyEmbedding, pb.IdentifyEmbeddingRequest(embedding=pb.Embedding(values=rng.standard_normal(d).tolist()), top_k=5))
                    for _ in range(500)
                ]
                per_thread = args.n // args.threads

                def enroll_many(worker: int) -> None:
                    for i in range(per_thread):
                        stub.Enroll(pb.EnrollRequest(identity_id=f"t{worker}-{i % 100}", embedding=pb.Embedding(values=rng.standard_normal(d).tolist())))

                threads = [threading.Thread(target=enroll_many, args=(w,)) for w in range(args.threads)]
                started = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - started
        finally:
            running.stop(None)

    print(f"gallery grows to {args.n} templates, d={d}, SQLite WAL synchronous=FULL, index IDMap2,Flat")
    print(summary("store commit (fsync)", store_times))
    print(summary("GalleryManager.enroll", manager_times))
    print(summary("gRPC Enroll (embedding)", grpc_times))
    print(summary(f"gRPC IdentifyEmbedding @{args.n}", search_times))
    total = per_thread * args.threads
    print(f"{args.threads} concurrent gRPC enrollers: {total / elapsed:.0f} enrolls/s ({elapsed / total * 1e3:.3f} ms per enroll; "
          f"single client {1 / np.mean(grpc_times[WARMUP:]):.0f}/s, ratio {total / elapsed * np.mean(grpc_times[WARMUP:]):.2f}x)")


if __name__ == "__main__":
    main()

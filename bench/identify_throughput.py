"""Identify throughput of the server from 8 concurrent clients against the hardware's own rate.

Two comparisons, each measured in rounds that alternate the baseline and the server in the same
process run (so both see the same machine load), printed as a rate per round and the median
ratio:

* **chips**: ``Identify`` with ``IMAGE_KIND_ALIGNED_CHIP`` (150x150 PNG chips, dlib's golden
  chips from ``../shared/golden_dlib/chips``) from ``--clients`` client threads of a separate
  process, chips/s, against raw onnxruntime: the model's embedder session run in batches of 8 on
  the same decoded chips in this process (``Embedder`` with the server's thread settings).
* **photos**: ``Identify`` on whole photos (``../shared/faces``, one face each) from the same
  clients, photos/s, against ``FacePipeline.analyze`` on the same photos in this process, called
  from one thread and from ``--clients`` threads (the better of the two is the baseline).

The server is the real one (``create_server`` with the default model, its batching embedder and
every interceptor) on a gallery of ``--identities`` enrolled embeddings (the default policy).

    python bench/identify_throughput.py [--quick] [--model-dir DIR] [--rounds 3] [--seconds 8]

Run ``uptime`` first: the machine's other load lowers both rates, the ratio much less.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHIPS_DIR = SHARED / "golden_dlib" / "chips"
FACES_DIR = SHARED / "faces"
#: Photos of one face each, of the sizes a gallery sees (LFW 250x250 news photos, ORL and Yale).
PHOTO_SOURCES = ("lfw", "yale", "orl")
RAW_BATCH = 8


def load_chips(count: int) -> list[bytes]:
    """PNG bytes of ``count`` golden dlib chips (150x150 RGB)."""
    paths = sorted(CHIPS_DIR.glob("*.png"))[:count]
    if len(paths) < count:
        raise SystemExit(f"need {count} chips in {CHIPS_DIR}, found {len(paths)}")
    return [p.read_bytes() for p in paths]


def load_photos(count: int) -> list[bytes]:
    """``count`` photos, spread over :data:`PHOTO_SOURCES` (sorted paths, every k-th file)."""
    per_source = -(-count // len(PHOTO_SOURCES))
    photos: list[bytes] = []
    for source in PHOTO_SOURCES:
        files = sorted(p for p in (FACES_DIR / source).rglob("*") if p.is_file())
        step = max(1, len(files) // per_source)
        photos += [p.read_bytes() for p in files[::step][:per_source]]
    return photos[:count]


def _client_process(port: int, images: list[bytes], kind: int, clients: int, seconds: float, results) -> None:
    """``clients`` threads calling Identify on ``images`` round robin for ``seconds``; puts calls/s."""
    import grpc

    from facegallery.v1 import gallery_service_pb2 as pb
    from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

    requests = [pb.IdentifyRequest(gallery="bench", image=pb.Image(data=d, kind=kind), top_k=5) for d in images]
    channel = grpc.insecure_channel(f"localhost:{port}")
    stub = pb_grpc.GalleryServiceStub(channel)
    for request in requests[:clients]:  # warm-up: connection, first batches
        stub.Identify(request, timeout=60)
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]
    counts = [0] * clients

    def run(worker: int) -> None:
        start.wait()
        i = worker
        while time.perf_counter() < stop_at[0]:
            stub.Identify(requests[i % len(requests)], timeout=60)
            counts[worker] += 1
            i += clients

    threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    results.put(sum(counts) / (time.perf_counter() - began))
    channel.close()


def server_rate(port: int, images: list[bytes], kind: int, clients: int, seconds: float) -> float:
    """Identify calls/s of ``clients`` concurrent clients (a separate process, so its GIL is its own)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(port, images, kind, clients, seconds, results))
    proc.start()
    rate = results.get(timeout=seconds + 300)
    proc.join()
    return rate


class _RawSession:
    """A plain onnxruntime session of the embedder (no facegallery code): ``embed(chips) -> (N, D)``."""

    def __init__(self, path: Path, intra_op_threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def embed(self, chips: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: chips})[0]


def _rate(step, threads: int, seconds: float) -> float:
    """Units/s of ``step(i)`` (one unit of work, returning how many units it did) called for
    ``seconds`` from ``threads`` threads; thread ``w`` passes i = w, w + threads, ..."""
    counts = [0] * threads
    stop_at = time.perf_counter() + seconds

    def run(worker: int) -> None:
        i = worker
        while time.perf_counter() < stop_at:
            counts[worker] += step(i)
            i += threads

    began = time.perf_counter()
    pool = [threading.Thread(target=run, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - began)


def raw_rate(embedder, chips: np.ndarray, seconds: float, threads: int = 1) -> float:
    """Chips/s of the embedder alone in batches of :data:`RAW_BATCH`, run by ``threads`` threads."""
    embedder.embed(chips[:RAW_BATCH])

    def all_chips(_: int) -> int:
        for i in range(0, len(chips) - RAW_BATCH + 1, RAW_BATCH):
            embedder.embed(chips[i : i + RAW_BATCH])
        return len(chips) // RAW_BATCH * RAW_BATCH

    return _rate(all_chips, threads, seconds)


def pipeline_rate(pipeline, photos: list[bytes], seconds: float, threads: int) -> float:
    """Photos/s of ``pipeline.analyze`` in this process from ``threads`` threads."""

    def one_photo(i: int) -> int:
        pipeline.analyze(photos[i % len(photos)])
        return 1

    return _rate(one_photo, threads, seconds)


def _report(what: str, unit: str, pairs: list[tuple[float, float]], baseline: str) -> float:
    for i, (base, served) in enumerate(pairs, 1):
        print(f"  round {i}: {baseline} {base:7.1f} {unit}   server {served:7.1f} {unit}   ratio {served / base:5.2f}")
    ratio = statistics.median(s / b for b, s in pairs)
    print(f"{what}: server {statistics.median(s for _, s in pairs):.1f} {unit}, {baseline} {statistics.median(b for b, _ in pairs):.1f} {unit}, ratio {ratio:.2f} (median of {len(pairs)} rounds)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="model directory (default: the default dlib model, converted on first use)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/server rounds per comparison")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one measurement, seconds")
    parser.add_argument("--identities", type=int, default=1000, help="enrolled identities of the searched gallery")
    parser.add_argument("--skip-photos", action="store_true", help="only the chip comparison")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s each (a smoke run, about 1 minute)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 3.0

    from facegallery.export.dlib.default_model import ensure_default_model
    from facegallery.server.face.decode import DecodeLimits, decode_image
    from facegallery.server.gallery.store import NewTemplate
    from facegallery.server.service.app import ServerConfig, create_server

    model_dir = ensure_default_model(args.model_dir)
    chip_bytes = load_chips(64)
    chips = np.stack([decode_image(b, DecodeLimits()) for b in chip_bytes]).astype(np.float32)  # as the session takes them
    photos = load_photos(24)
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (load averages), {os.cpu_count()} cores")
    print(f"{len(chip_bytes)} chips ({statistics.fmean(len(b) for b in chip_bytes) / 1e3:.0f} KB PNG each), {len(photos)} photos, {args.clients} clients, model {model_dir}")

    from facegallery.v1 import gallery_service_pb2 as pb

    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(data_dir=Path(tmp), port=0, model_dir=model_dir, snapshot_interval_s=None)
        running = create_server(config)
        try:
            manager = running.manager
            pipeline = manager.pipeline
            manager.create_gallery("bench")
            rng = np.random.default_rng(0)
            v = rng.standard_normal((args.identities, manager.model.embedding_dim)).astype(np.float32)
            v *= 0.5 / np.linalg.norm(v, axis=1, keepdims=True)
            manager.import_embeddings("bench", pipeline.model_id, [NewTemplate(f"p{i:05d}", row) for i, row in enumerate(v)])
            manager.decision_status("bench")  # calibrates once, so no recalibration runs during the rounds
            embedder_file = manager.model.path_of(model_dir, "embedder")
            cores = os.cpu_count() or 1

            def raw_best() -> float:
                """The better of onnxruntime's default session options from one thread and of one
                intra-op thread per run from one thread per core: what onnxruntime does here."""
                rates = (raw_rate(_RawSession(embedder_file, 0), chips, args.seconds / 2), raw_rate(_RawSession(embedder_file, 1), chips, args.seconds / 2, cores))
                print(f"  raw ORT b8: {rates[0]:.1f} chips/s (onnxruntime defaults, 1 thread), {rates[1]:.1f} chips/s (1 intra-op thread, {cores} threads)")
                return max(rates)

            print("\nchips: Identify(ALIGNED_CHIP) from clients vs raw onnxruntime batch 8")
            pairs = []
            for _ in range(args.rounds):
                base = raw_best()
                served = server_rate(running.port, chip_bytes, pb.IMAGE_KIND_ALIGNED_CHIP, args.clients, args.seconds)
                pairs.append((base, served))
            _report("chips", "chips/s", pairs, "raw ORT b8")

            if not args.skip_photos:
                print("\nphotos: Identify(PHOTO) from clients vs FacePipeline.analyze in process")
                pairs = []
                for _ in range(args.rounds):
                    base = max(pipeline_rate(pipeline, photos, args.seconds, 1), pipeline_rate(pipeline, photos, args.seconds, args.clients))
                    served = server_rate(running.port, photos, pb.IMAGE_KIND_PHOTO, args.clients, args.seconds)
                    pairs.append((base, served))
                _report("photos", "photos/s", pairs, "pipeline")
        finally:
            running.stop(1.0)


if __name__ == "__main__":
    main()

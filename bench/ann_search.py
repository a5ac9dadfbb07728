"""Issue 10: approximate search (IVF-Flat, ann_index.py) against exact search, on face-like data.

Face-like identities from real dlib embeddings (``--images``, default the first ``--max-images``
photos of ``../shared/faces/lfw``, embedded once through the evaluation cache,
export/evaluate/embedding_cache.py): an identity is a real embedding moved by ``alpha`` times the
difference of two real embeddings of different people (alpha uniform in [0.35, 0.65]); a
genuine probe is an identity plus a real same-person difference (two photos of one LFW person:
median ~0.43 L2), an impostor a fresh identity that is not enrolled. Half the probes are each.
Per size (default 100k and 1M, one template per identity) it prints, with one faiss thread per
search as the server (app.py ``DEFAULT_SEARCH_THREADS``):

* build time, memory per template (RSS added / templates, and serialized bytes / templates)
  and single-query search p50/p99 of the exact index, the IVF index and (up to ``--hnsw-max``)
  faiss HNSW32, with the ratio against exact measured in the same run;
* recall@1 of the approximate indexes against exact search (all / genuine / impostor probes),
  and that no deleted template is returned after removing every probe's exact nearest one;
* at the largest size, through ``GalleryManager`` (default policy: S-norm, mean templates):
  build from the store, the open-set calibration (leave-one-out of 2,000 identities), identify
  p50 with a cold cohort cache, and start-up from the snapshots in a fresh process (ready time,
  RSS; for IVF also when the first identification returns: with the calibration the store
  kept, it does not wait for a new one);
* recovery as after ``kill -9``: templates written to the store after the last snapshot
  (``--recovery-changes``, cumulative, each a new identity as an import adds them), then a
  fresh process starts from the IVF snapshots, replaying them: ready time, first
  identification, RSS.

``--quick``: 20k and 100k, no HNSW, 300 probes, 2,000 changes replayed (about 3 minutes). The
default run takes ~20 minutes on 2 idle cores (``--sizes 1000000 --hnsw-max 0``: ~13).

    python bench/ann_search.py [--quick] [--sizes 100000,1000000] [--probes 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from facegallery.server.gallery.ann_index import IndexPlan, nlist_for
from facegallery.server.gallery.decision import DecisionPolicy
from facegallery.server.gallery.index import FaissIndex, set_search_threads
from facegallery.server.gallery.store import NewTemplate, SqliteTemplateStore

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GALLERY = "default"
BENCH = Path(__file__).resolve().parent
ALPHA = (0.35, 0.65)  # identity = real embedding + alpha * (difference of two different people)


class FaceLike:
    """Synthetic identities and probes made from real embeddings ``x`` ``(n, D) float32`` of
    people ``labels`` ``(n,)`` (at least one person with two photos)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, seed: int = 0) -> None:
        self.x, self.rng = np.asarray(x, np.float32), np.random.default_rng(seed)
        by: dict[str, list[int]] = {}
        for i, label in enumerate(labels.tolist()):
            by.setdefault(label, []).append(i)
        pairs = [(a, b) for rows in by.values() for a in rows for b in rows if a != b]
        self.same = np.array([self.x[a] - self.x[b] for a, b in pairs], np.float32)
        a, b = self.rng.integers(len(self.x), size=(2, 20 * len(self.x)))
        keep = labels[a] != labels[b]
        self.different = self.x[a[keep]] - self.x[b[keep]]

    def identities(self, n: int) -> np.ndarray:
        """``(n, D) float32`` identity embeddings."""
        base = self.x[self.rng.integers(len(self.x), size=n)]
        alpha = self.rng.uniform(*ALPHA, size=(n, 1)).astype(np.float32)
        return base + alpha * self.different[self.rng.integers(len(self.different), size=n)]

    def genuine(self, enrolled: np.ndarray) -> np.ndarray:
        """Another photo of each enrolled identity: plus a real same-person difference."""
        return enrolled + self.same[self.rng.integers(len(self.same), size=len(enrolled))]


def golden_embeddings(shared: Path = SHARED) -> tuple[np.ndarray, np.ndarray]:
    """dlib's own descriptors of ../shared/golden_dlib (459 single-person photos of 252 people):
    real embeddings without running a model (tests)."""
    x, labels = [], []
    for line in (shared / "golden_dlib" / "golden.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if row and not row["image"].startswith("_") and row["faces"]:
            x.append(row["faces"][0]["descriptor"])
            labels.append("/".join(row["image"].split("/")[:2]))
    return np.array(x, np.float32), np.array(labels)


def lfw_embeddings(images: Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Central-face embeddings of the first ``limit`` photos (path order) under ``images``."""
    from facegallery.export.dlib.default_model import ensure_default_model
    from facegallery.export.evaluate.embedding_cache import cached_embeddings
    from facegallery.server.contract.paths import user_data_dir
    from facegallery.server.face.pipeline import FacePipeline

    pipeline = FacePipeline.from_model_dir(ensure_default_model(user_data_dir() / "models" / "dlib_resnet_v1"))
    rels = sorted(str(p.relative_to(images)) for p in images.glob("*/*") if p.is_file())[:limit]
    found = {rel: v for rel, v in cached_embeddings(pipeline, images, rels, workers=2, progress=False).items() if v is not None}
    return np.stack(list(found.values())), np.array([rel.split("/")[0] for rel in found])


def latencies(index, probes: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Single-query search times (s) and the top-1 ids ``(n,)``."""
    times, top = [], []
    for p in probes:
        started = time.perf_counter()
        _, ids = index.search(p[None], 1)
        times.append(time.perf_counter() - started)
        top.append(ids[0, 0])
    return times, np.array(top)


def ms(times: list[float]) -> str:
    return f"p50 {np.percentile(times, 50) * 1e3:7.3f} p99 {np.percentile(times, 99) * 1e3:7.3f} ms"


def recall(top: np.ndarray, exact: np.ndarray, half: int) -> str:
    return f"recall@1 {np.mean(top == exact):.4f} (genuine {np.mean(top[:half] == exact[:half]):.4f}, impostor {np.mean(top[half:] == exact[half:]):.4f})"


def _open_set():
    """bench/open_set.py (its embedding-only analyzer and rss_mb), imported on first use: it
    pulls in the server (app.py), seconds the tests that use this module's generator need not pay."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import open_set

    return open_set


def rss_mb() -> float:
    return _open_set().rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident set size since it started, MB (``VmHWM``; ``ru_maxrss`` would
    include the forking parent's, which Linux carries across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def built(label: str, make, n: int, serialize=None):
    """``make()``, printing its build time and its serialized bytes per template (what it holds
    in memory, less allocator slack: faiss keeps vectors and ids in flat arrays)."""
    started = time.perf_counter()
    index = make()
    seconds = time.perf_counter() - started
    nbytes = (serialize or (lambda i: i.serialize()))(index).nbytes
    print(f"  {label:<18} build {seconds:6.1f} s, {nbytes / n:5.0f} B/template", flush=True)
    return index


def bench_indexes(n: int, faces: FaceLike, args: argparse.Namespace) -> np.ndarray:
    """The index-level comparison at ``n`` templates; returns the gallery ``(n, D)``."""
    x = faces.identities(n)
    ids = np.arange(n, dtype=np.int64)
    half = args.probes // 2
    probes = np.concatenate([faces.genuine(x[faces.rng.integers(n, size=half)]), faces.identities(args.probes - half)])
    print(f"[{n}] load {uptime()}", flush=True)
    set_search_threads(None)
    exact = built("exact IDMap2,Flat", lambda: _filled(FaissIndex(x.shape[1]), ids, x), n)
    ivf = built(f"IVF{nlist_for(n)},Flat", lambda: IndexPlan().build(x.shape[1], ids, x, factory=f"IVF{nlist_for(n)},Flat"), n)
    set_search_threads(1)
    t_exact, top_exact = latencies(exact, probes)
    t_ivf, top_ivf = latencies(ivf, probes)
    print(f"  exact              {ms(t_exact)}")
    print(f"  {ivf.factory:<18} {ms(t_ivf)}  {recall(top_ivf, top_exact, half)}  x{np.median(t_exact) / np.median(t_ivf):.0f} faster (p50)")
    ivf.remove(top_exact)
    _, after = ivf.search(probes, 10)
    print(f"  deleted the {len(np.unique(top_exact))} exact nearest templates: {int(np.isin(after, top_exact).sum())} returned afterwards")
    if n <= args.hnsw_max:
        set_search_threads(None)
        hnsw = built("HNSW32", lambda: _hnsw(x), n, faiss.serialize_index)
        set_search_threads(1)
        for ef in (32, 64, 128):
            hnsw.hnsw.efSearch = ef
            t_h, top_h = latencies(hnsw, probes)
            print(f"  HNSW32 ef {ef:<8} {ms(t_h)}  {recall(top_h, top_exact, half)}")
        del hnsw
    del exact, ivf
    return x


def _filled(index, ids, x):
    index.add(ids, x)
    return index


def _hnsw(x):
    index = faiss.IndexHNSWFlat(x.shape[1], 32)
    index.hnsw.efConstruction = 64
    index.add(x)
    return index


def bench_gallery(x: np.ndarray, faces: FaceLike, args: argparse.Namespace, tmp: Path) -> None:
    """GalleryManager at ``len(x)`` templates: calibration, identify, start-up from the snapshot."""
    from facegallery.server.gallery.manager import GalleryManager

    n, d = x.shape
    analyzer = _open_set().EmbeddingsOnly(_manifest())
    store = SqliteTemplateStore(tmp / "gallery.sqlite3")
    store.create_gallery(GALLERY, model_id=analyzer.model_id, threshold=0.6, metric="euclidean", embedding_dim=d)
    store.set_policy(GALLERY, DecisionPolicy.targeting(0.01), 0.6)  # the default: S-norm over mean templates
    started = time.perf_counter()
    for start in range(0, n, 50_000):
        store.add_templates(GALLERY, [NewTemplate(f"id{i:07d}", x[i]) for i in range(start, min(n, start + 50_000))])
    print(f"[{n}] gallery: store filled in {time.perf_counter() - started:.0f} s; load {uptime()}", flush=True)
    half = args.probes // 2
    probes = np.concatenate([faces.genuine(x[faces.rng.integers(n, size=half)]), faces.identities(args.probes - half)])
    results = {}
    set_search_threads(1)
    for kind, options in (("ivf", {}), ("exact", {"approximate_above": None})):
        forget_calibration(tmp / "gallery.sqlite3")  # so each kind computes its own
        started = time.perf_counter()
        manager = GalleryManager(store, analyzer, index_dir=tmp / f"index-{kind}", **options)  # type: ignore[arg-type]
        load = time.perf_counter() - started
        started = time.perf_counter()
        status = manager.decision_status(GALLERY)
        calibration = time.perf_counter() - started
        times = []
        for p in probes[:200]:
            t = time.perf_counter()
            manager.identify_embedding(GALLERY, p, top_k=5)
            times.append(time.perf_counter() - t)
        results[kind] = (calibration, float(np.median(times)))
        print(
            f"  {kind:<5} build from the store {load:6.1f} s; calibration {calibration:6.1f} s "
            f"(threshold {status.threshold:.3f} {status.score_kind.value}); identify (S-norm, top 5) {ms(times)}",
            flush=True,
        )
        manager.snapshot()
    print(f"  calibration x{results['exact'][0] / results['ivf'][0]:.0f} faster, identify x{results['exact'][1] / results['ivf'][1]:.0f} faster with IVF")
    store.close()
    for kind in ("ivf", "exact"):
        command = [sys.executable, __file__, "--startup", str(tmp), "--startup-kind", kind] + (["--startup-identify"] if kind == "ivf" else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        first = figures.get("first_identify_s")
        print(
            f"  start-up from the {kind} snapshots (fresh process): ready in {figures['ready_s']:.2f} s, RSS {figures['rss_mb']:.0f} MB "
            f"(peak {figures['peak_rss_mb']:.0f} MB while loading), "
            f"{(figures['rss_mb'] - figures['rss_before_mb']) * 2**20 / n:.0f} B/template (templates + mean templates)"
            + (f", first identify after {first:.2f} s (with the stored calibration)" if first is not None else ""),
            flush=True,
        )
        for line in out.stderr.splitlines():
            if " ready (" in line:
                print(f"    {line}")
    bench_recovery(x, faces, args, tmp)


def bench_recovery(x: np.ndarray, faces: FaceLike, args: argparse.Namespace, tmp: Path) -> None:
    """Templates added to the store beyond the IVF snapshots (as a server killed after acknowledging
    them leaves it), then a fresh process starting from those snapshots: ready, first identify, RSS."""
    n = len(x)
    written = 0
    for changes in sorted(args.recovery_changes):
        store = SqliteTemplateStore(tmp / "gallery.sqlite3", integrity_check="off")
        added = faces.identities(changes - written)
        for start in range(0, len(added), 50_000):
            store.add_templates(GALLERY, [NewTemplate(f"new{written + start + i:07d}", row) for i, row in enumerate(added[start : start + 50_000])])
        store.close()
        written = changes
        command = [sys.executable, __file__, "--startup", str(tmp), "--startup-kind", "ivf", "--startup-identify"]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"  recovery of {n} templates + {changes} written after the snapshot (fresh process): ready in {figures['ready_s']:.2f} s, "
            f"first identify after {figures['first_identify_s']:.2f} s, RSS {figures['rss_mb']:.0f} MB (peak {figures['peak_rss_mb']:.0f} MB while loading)",
            flush=True,
        )


def forget_calibration(path: Path) -> None:
    """Drop the calibrations the store keeps (store.py, schema 5): a bench-only reset."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM calibrations")


def startup(data: Path, kind: str, identify: bool) -> None:
    """Child process: open the gallery from its snapshot, print ready time, RSS and, with
    ``identify``, when the first identification returned (JSON)."""
    from facegallery.server.gallery.manager import GalleryManager

    analyzer = _open_set().EmbeddingsOnly(_manifest())
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("facegallery.server.gallery.snapshot").setLevel(logging.INFO)  # what each index took
    set_search_threads(1)
    before = rss_mb()
    started = time.perf_counter()
    store = SqliteTemplateStore(data / "gallery.sqlite3", integrity_check="off")
    options = {} if kind == "ivf" else {"approximate_above": None}
    manager = GalleryManager(store, analyzer, index_dir=data / f"index-{kind}", **options)  # type: ignore[arg-type]
    ready = time.perf_counter() - started
    figures = {"ready_s": ready, "rss_mb": rss_mb(), "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}
    if identify:
        manager.identify_embedding(GALLERY, store.identity_sample(GALLERY, 1)[1][0], top_k=5)
        figures["first_identify_s"] = time.perf_counter() - started
    print(json.dumps(figures))


def _manifest():
    from facegallery.export.dlib.default_model import ensure_default_model
    from facegallery.server.contract.manifest import ModelManifest
    from facegallery.server.contract.paths import user_data_dir

    return ModelManifest.load(ensure_default_model(user_data_dir() / "models" / "dlib_resnet_v1"))


def uptime() -> str:
    try:
        return "(load average " + Path("/proc/loadavg").read_text().split()[0] + ")"
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated template counts (default 100000,1000000; --quick 20000,100000)")
    parser.add_argument("--probes", type=int, default=None, help="probes per size, half genuine (default 1000; --quick 300)")
    parser.add_argument("--images", type=Path, default=SHARED / "faces" / "lfw")
    parser.add_argument("--max-images", type=int, default=5000)
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size HNSW is built at (minutes at 1M here)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recovery-changes", default=None, help="comma-separated templates written after the snapshot (default 10000,100000; --quick 2000)")
    parser.add_argument("--startup", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--startup-kind", default="ivf", help=argparse.SUPPRESS)
    parser.add_argument("--startup-identify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup is not None:
        return startup(args.startup, args.startup_kind, args.startup_identify)
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(s) for s in (args.sizes or ("20000,100000" if args.quick else "100000,1000000")).split(",")]
    args.probes = args.probes or (300 if args.quick else 1000)
    args.recovery_changes = [int(s) for s in (args.recovery_changes or ("2000" if args.quick else "10000,100000")).split(",")]
    if args.quick:
        args.hnsw_max = 0
    faces = FaceLike(*lfw_embeddings(args.images, args.max_images))
    print(f"{len(faces.x)} real embeddings, {len(faces.same)} same-person differences (median {np.median(np.linalg.norm(faces.same, axis=1)):.2f} L2)")
    x = None
    for n in sizes:
        x = bench_indexes(n, faces, args)
    with tempfile.TemporaryDirectory(prefix="ann_search_") as tmp:
        bench_gallery(x, faces, args, Path(tmp))


if __name__ == "__main__":
    main()

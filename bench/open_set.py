"""Issue 12: what open-set decisions cost, S-norm vs plain distance, at 10k, 100k and 1M templates.

In-process ``GalleryManager`` (no gRPC, no face pipeline) over a temporary data directory, one
gallery per size filled through ``import_embeddings`` with synthetic 128-d float32 embeddings, one
template per identity: standard normal vectors scaled by ``--spread / sqrt(2 * 128)``, so two
identities are ~``--spread`` (default 1.0) apart in L2, as different people are for a face
model. Half the probes are an enrolled template plus noise (~0.4 away, "mated"), half fresh
vectors (strangers). The gallery first decides with ``DecisionPolicy.targeting(0.01,
normalization=NONE)`` (distance), then switches (``update_gallery``) to ``targeting(0.01)``
(S-norm, k=100). Per size it prints:

* import rate (templates/s, 256 per transaction) and the RSS it added;
* calibration: the first ``decision_status`` under each policy (leave-one-out searches of up to
  2,000 identities; S-norm also computes the cohort neighbours of every candidate they meet);
* ``identify_embedding`` (top_k 5) p50/p95 ms over ``--probes`` probes, first pass and again
  with the same probes; for S-norm the first pass starts from an emptied cohort cache ("cold",
  the calibration's entries dropped), the second finds every candidate cached ("warm"); and the
  ratio S-norm / distance;
* ``enroll`` of a new identity (embedding), p50 over ``--enrolls``, under each policy.

Times are wall clock and process CPU (``time.process_time``; on a shared machine the CPU time is
the steadier figure). faiss uses the server's per-search threads (``app.DEFAULT_SEARCH_THREADS``)
unless ``--search-threads`` says otherwise; calibration runs in the searching thread, as in the
server. The default run took 11 minutes on 2 idle cores (9 at 1M, most of that its two
calibrations, ~2 and ~3.5 minutes) and up to twice that on a loaded machine. ``--sample-calibration-above N`` makes galleries above N
templates calibrate on a leave-one-out sample of ``--loo-sample`` identities instead of
decision.py's ``LOO_SAMPLE`` (2,000; patched for that gallery only); the table then shows the
full calibration scaled linearly (``~``: one search per sampled identity plus one per uncached
candidate; at 1M it overestimated the measured full S-norm calibration by ~1.2x).
``--blas-threshold`` sets ``faiss.cvar.distance_compute_blas_threshold`` (faiss's default: batched
searches below it scan once per query instead of one BLAS product).

    python bench/open_set.py [--sizes 10000,100000,1000000] [--probes 200] [--enrolls 20]
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from facegallery.export.dlib.default_model import ensure_default_model
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.gallery import decision
from facegallery.server.gallery.decision import DecisionPolicy, Normalization
from facegallery.server.gallery.index import set_search_threads
from facegallery.server.gallery.manager import GalleryManager
from facegallery.server.gallery.store import NewTemplate
from facegallery.server.service.app import DEFAULT_SEARCH_THREADS

DISTANCE = DecisionPolicy.targeting(0.01, normalization=Normalization.NONE)
SNORM = DecisionPolicy.targeting(0.01)
GALLERY = "bench"
CHUNK = 8192  # embeddings generated at a time
MATED_NOISE = 0.4  # L2 distance of a mated probe from its template


class EmbeddingsOnly:
    """The pipeline surface GalleryManager needs, for embedding-only calls."""

    def __init__(self, manifest: ModelManifest) -> None:
        self.manifest = manifest
        self.model_id = manifest.embedding_id(False)

    def analyze(self, image, **kwargs):
        raise RuntimeError("embedding-only benchmark: no images")

    def probability_same(self, a, b):
        return None


def rss_mb() -> float:
    """Current resident set size in MB (peak RSS where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gallery_templates(n: int, d: int, scale: float, seed: int, keep: set[int], kept: dict[int, np.ndarray]) -> Iterator[NewTemplate]:
    """``n`` one-template identities ``id0000000..``; the embeddings of indices in ``keep`` go to ``kept``."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        x = rng.standard_normal((min(CHUNK, n - start), d), dtype=np.float32) * np.float32(scale)
        for j, e in enumerate(x):
            if start + j in keep:
                kept[start + j] = e.copy()
            yield NewTemplate(f"id{start + j:07d}", e)


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def pct(times: list[tuple[float, float]], q: float, which: int = 0) -> float:
    """The ``q`` percentile in ms of the wall (``which`` 0) or CPU (1) times."""
    return float(np.percentile([t[which] * 1e3 for t in times], q))


def lat(times: list[tuple[float, float]]) -> str:
    return f"p50 {pct(times, 50):8.2f} p95 {pct(times, 95):8.2f} ms (CPU p50 {pct(times, 50, 1):8.2f})"


def secs(t: tuple[float, float]) -> str:
    return f"{t[0]:.2f} s (CPU {t[1]:.2f} s)"


def both(times: list[tuple[float, float]]) -> str:
    """``p50 wall/p50 CPU`` in ms."""
    return f"{pct(times, 50):.1f}/{pct(times, 50, 1):.1f}"


def cal(t: tuple[float, float], scale: float) -> str:
    """``wall/CPU`` seconds of a calibration, ``~``-marked and scaled when it ran on a sample."""
    return f"{t[0]:.1f}/{t[1]:.1f}" if scale == 1 else f"~{t[0] * scale:.1f}/{t[1] * scale:.1f}"


def bench_size(n: int, args: argparse.Namespace, analyzer: EmbeddingsOnly) -> dict:
    d = analyzer.manifest.embedding_dim
    scale = args.spread / math.sqrt(2 * d)
    rng = np.random.default_rng(args.seed + 1)
    half = args.probes // 2
    mated_of = rng.choice(n, size=half, replace=False)
    kept: dict[int, np.ndarray] = {}
    out: dict = {"n": n, "loo": min(n, decision.LOO_SAMPLE), "loo_scale": 1.0}
    full_sample = decision.LOO_SAMPLE
    if args.sample_calibration_above is not None and n > args.sample_calibration_above:
        decision.LOO_SAMPLE = args.loo_sample  # read by decision.loo_sample_size at each calibration
        out["loo"], out["loo_scale"] = args.loo_sample, min(n, full_sample) / args.loo_sample
    with tempfile.TemporaryDirectory(prefix="open_set_") as tmp:
        manager = GalleryManager.open(Path(tmp), analyzer)
        try:
            manager.create_gallery(GALLERY, policy=DISTANCE)
            rss0 = rss_mb()
            started, cpu = time.perf_counter(), time.process_time()
            result = manager.import_embeddings(GALLERY, analyzer.model_id, gallery_templates(n, d, scale, args.seed, set(mated_of.tolist()), kept))
            out["import"] = (time.perf_counter() - started, time.process_time() - cpu)
            assert result.imported == n, result
            out["rss_import"] = rss_mb() - rss0
            print(f"[{n}] imported {n} templates in {secs(out['import'])}: {n / out['import'][0]:.0f}/s, RSS +{out['rss_import']:.0f} MB", flush=True)

            mated = np.stack([kept[i] for i in mated_of.tolist()])
            mated = mated + rng.standard_normal(mated.shape, dtype=np.float32) * np.float32(MATED_NOISE / math.sqrt(d))
            strangers = rng.standard_normal((args.probes - half, d), dtype=np.float32) * np.float32(scale)
            probes = np.concatenate([mated, strangers]).astype(np.float32)

            def search_pass() -> list[float]:
                return [timed(manager.identify_embedding, GALLERY, p, top_k=5) for p in probes]

            def enroll_pass(tag: str) -> list[float]:
                x = rng.standard_normal((args.enrolls, d), dtype=np.float32) * np.float32(scale)
                return [timed(manager.enroll, GALLERY, f"new-{tag}-{i}", embedding=e) for i, e in enumerate(x)]

            scorer = manager._gallery(GALLERY).scorer  # benchmark only: cohort-cache size, and emptying it

            out["cal_distance"] = timed(manager.decision_status, GALLERY)
            status = manager.decision_status(GALLERY)
            print(f"[{n}] distance calibration {secs(out['cal_distance'])}: threshold {status.threshold:.4f} ({status.basis})", flush=True)
            out["distance_first"] = search_pass()
            out["distance_again"] = search_pass()
            out["enroll_distance"] = enroll_pass("d")
            print(f"[{n}] distance search {lat(out['distance_first'])}, again {lat(out['distance_again'])}", flush=True)
            print(f"[{n}] distance enroll {lat(out['enroll_distance'])}", flush=True)

            manager.update_gallery(GALLERY, policy=SNORM)
            rss1 = rss_mb()
            out["cal_snorm"] = timed(manager.decision_status, GALLERY)
            status = manager.decision_status(GALLERY)
            out["cached_after_cal"] = len(scorer._neighbours)
            out["rss_cal"] = rss_mb() - rss1
            print(
                f"[{n}] S-norm calibration {secs(out['cal_snorm'])}: threshold {status.threshold:.4f} ({status.score_kind.value}; {status.basis}); "
                f"cohort cache {out['cached_after_cal']} identities, RSS +{out['rss_cal']:.0f} MB",
                flush=True,
            )
            scorer._neighbours.clear()
            out["snorm_cold"] = search_pass()
            out["snorm_warm"] = search_pass()
            out["enroll_snorm"] = enroll_pass("s")
            print(f"[{n}] S-norm search cold {lat(out['snorm_cold'])}, warm {lat(out['snorm_warm'])}", flush=True)
            print(f"[{n}] S-norm enroll {lat(out['enroll_snorm'])}", flush=True)
            out["rss_total"] = rss_mb() - rss0
        finally:
            decision.LOO_SAMPLE = full_sample
            out["close"] = timed(manager.close)  # writes the index snapshot
            print(f"[{n}] close (final snapshot) {secs(out['close'])}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated gallery sizes (templates = identities)")
    parser.add_argument("--probes", type=int, default=200, help="identify_embedding probes per pass (half mated, half strangers)")
    parser.add_argument("--enrolls", type=int, default=20, help="enrollments timed per policy")
    parser.add_argument("--spread", type=float, default=1.0, help="typical L2 distance between two identities")
    parser.add_argument("--search-threads", type=int, default=DEFAULT_SEARCH_THREADS, help="faiss threads per search (the server's default)")
    parser.add_argument("--sample-calibration-above", type=int, default=None, help="larger galleries calibrate on --loo-sample identities (default: none)")
    parser.add_argument("--loo-sample", type=int, default=300, help="leave-one-out sample of those galleries (decision.LOO_MIN_IDENTITIES = 300 for a fit)")
    parser.add_argument("--blas-threshold", type=int, default=None, help="faiss.cvar.distance_compute_blas_threshold (default: faiss's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    set_search_threads(args.search_threads)
    if args.blas_threshold is not None:
        faiss.cvar.distance_compute_blas_threshold = args.blas_threshold
    analyzer = EmbeddingsOnly(ModelManifest.load(ensure_default_model()))
    wall = time.perf_counter()
    rows = [bench_size(n, args, analyzer) for n in sizes]
    wall = time.perf_counter() - wall

    print()
    print(
        f"d={analyzer.manifest.embedding_dim}, one template per identity, IDMap2,Flat, faiss {faiss.__version__} threads per search {args.search_threads}, "
        f"blas threshold {faiss.cvar.distance_compute_blas_threshold}; {args.probes} probes, top_k 5; S-norm = target FPIR 0.01, k=100; distance = no normalisation"
    )
    print("ms: p50 wall / p50 CPU; ratios on CPU; calibration s: wall / CPU, ~ = scaled from a LOO sample to the full 2,000")
    head = (f"{'templates':>10} {'import/s':>8} {'RSS MB':>6} {'LOO':>5} {'cal dist s':>13} {'cal S-norm s':>15} {'cache':>6} "
            f"{'distance ms':>13} {'S-norm cold':>15} {'S-norm warm':>13} {'cold/d':>7} {'warm/d':>7} {'enroll d ms':>13} {'enroll S ms':>15} {'S/d':>6}")
    print(head)
    for r in rows:
        dist = pct(r["distance_again"], 50, 1)
        print(
            f"{r['n']:>10} {r['n'] / r['import'][0]:>8.0f} {r['rss_total']:>6.0f} {r['loo']:>5} {cal(r['cal_distance'], r['loo_scale']):>13} {cal(r['cal_snorm'], r['loo_scale']):>15} {r['cached_after_cal']:>6} "
            f"{both(r['distance_again']):>13} {both(r['snorm_cold']):>15} {both(r['snorm_warm']):>13} "
            f"{pct(r['snorm_cold'], 50, 1) / dist:>6.1f}x {pct(r['snorm_warm'], 50, 1) / dist:>6.1f}x "
            f"{both(r['enroll_distance']):>13} {both(r['enroll_snorm']):>15} {pct(r['enroll_snorm'], 50, 1) / pct(r['enroll_distance'], 50, 1):>5.1f}x"
        )
    print("distance = its second pass over the probes; cal = first decision_status after import / after the switch to S-norm; cache = cohort")
    print(f"entries the S-norm calibration left (emptied before the cold pass); RSS = growth over the size's run; wall time {wall:.0f} s")


if __name__ == "__main__":
    main()

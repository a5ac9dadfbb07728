"""Bulk load: templates from an ``.npz`` into a fresh server over gRPC, against the single-template stream.

Starts ``facegallery serve`` as a subprocess on a fresh data directory (the default model,
converted on first start) and times, end to end (file read, gRPC, durable commits, index), in
this order on one server, each into a gallery of its own:

1. baseline: ``--baseline-n`` templates from a JSON Lines file, streamed one template per
   message (``import-embeddings`` of a ``.jsonl`` file, the path older clients use), scaled up
   linearly to ``--n``;
2. bulk: ``--n`` templates from an ``.npz`` (``import-embeddings`` of a ``.npz`` file:
   batches of ``--batch-size``, each acknowledged once durable);
3. resume: the same ``.npz`` again (every template already stored, so all are skipped).

Embeddings are seeded synthetic ``(n, 128) float32`` unit vectors, ``--per-identity`` templates
per identity. The gallery's policy (``--policy``): ``nearest`` (a target FPIR on each identity's
nearest template) or ``default`` (the server's default, mean templates, whose per-identity means
the index recomputes after each commit). The machine's load average is printed before and
after, since other work on the machine slows every figure.

    python bench/import_npz.py            # 1M (about 5 minutes); --quick: 100k
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facegallery.client import GalleryClient
from facegallery.client.embedding_files import EXPORT_FORMAT, read_jsonl, read_table

DIM = 128
START_TIMEOUT_S = 120.0
_LISTENING = re.compile(r"listening on \S+?:(\d+) ")


def synthetic(n: int, per_identity: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``(identity_ids (n,), x (n, DIM) float32 unit rows)``, ``per_identity`` consecutive rows per identity."""
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"person-{i // per_identity:07d}" for i in range(n)], x


def write_jsonl(path: Path, model_id: str, ids: list[str], x: np.ndarray) -> None:
    """An export-gallery JSON Lines file of the templates (no names or metadata)."""
    with path.open("w") as out:
        out.write(json.dumps({"format": EXPORT_FORMAT, "gallery": {"model_id": model_id}}) + "\n")
        for i, (identity_id, row) in enumerate(zip(ids, x.tolist(), strict=True)):
            out.write(json.dumps({"identity_id": identity_id, "template_id": i, "embedding": row}) + "\n")


def start_server(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """``facegallery serve`` on 127.0.0.1, port 0; returns the process and its port once it logs it."""
    exe = Path(sys.executable).with_name("facegallery")
    command = [str(exe), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if found := _LISTENING.search(log_path.read_text(errors="replace")):
            return process, int(found.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}")


def create(client: GalleryClient, name: str, policy: str) -> None:
    """An empty gallery: target FPIR 0.01 on nearest templates, or the server's default policy."""
    client.create_gallery(name, **({"target_fpir": 0.01, "aggregation": "nearest"} if policy == "nearest" else {}))


def load() -> str:
    """The machine's 1, 5 and 15 minute load averages."""
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="templates of the bulk load")
    parser.add_argument("--baseline-n", type=int, default=50_000, help="templates of the single-template baseline (scaled to --n)")
    parser.add_argument("--quick", action="store_true", help="--n 100000 --baseline-n 20000")
    parser.add_argument("--per-identity", type=int, default=2, help="templates per identity")
    parser.add_argument("--batch-size", type=int, default=16_384, help="templates per acknowledged batch")
    parser.add_argument("--policy", choices=("nearest", "default"), default="nearest", help="the galleries' decision policy")
    args = parser.parse_args()
    if args.quick:
        args.n, args.baseline_n = 100_000, 20_000
    print(f"bulk load of {args.n} templates (d={DIM}, {args.per_identity} per identity, batch {args.batch_size}, policy {args.policy}), "
          f"{os.cpu_count()} cores; {load()}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        process, port = start_server(tmp_dir / "data", tmp_dir / "server.log")
        try:
            with GalleryClient(f"127.0.0.1:{port}", stream_timeout=None) as client:
                client.wait_ready(START_TIMEOUT_S)
                model_id = client.server_info().model.model_id
                ids, x = synthetic(args.n, args.per_identity)
                npz = tmp_dir / "bulk.npz"
                np.savez(npz, embeddings=x, identity_ids=np.array(ids), model_id=np.array(model_id))
                jsonl = tmp_dir / "baseline.jsonl"
                b_ids, b_x = synthetic(args.baseline_n, args.per_identity, seed=1)
                write_jsonl(jsonl, model_id, b_ids, b_x)
                del x, b_x

                create(client, "baseline", args.policy)
                started = time.perf_counter()
                header, templates = read_jsonl(jsonl)
                result = client.import_embeddings(templates, model_id=header["gallery"]["model_id"], gallery="baseline")
                baseline_s = time.perf_counter() - started
                assert result.imported == args.baseline_n, result
                rate = args.baseline_n / baseline_s
                print(f"baseline  .jsonl, one template per message: {args.baseline_n:>9} in {baseline_s:7.2f} s = {rate:9.0f} templates/s "
                      f"-> {args.n} in {args.n / rate:7.1f} s (scaled)")

                create(client, "bulk", args.policy)
                started = time.perf_counter()
                result = client.import_embeddings(read_table(npz), gallery="bulk", batch_size=args.batch_size)
                bulk_s = time.perf_counter() - started
                assert result.imported == args.n, result
                print(f"bulk      .npz, batches of {args.batch_size}:        {args.n:>9} in {bulk_s:7.2f} s = {args.n / bulk_s:9.0f} templates/s "
                      f"({args.n / rate / bulk_s:.1f}x the baseline)")

                started = time.perf_counter()
                result = client.import_embeddings(read_table(npz), gallery="bulk", batch_size=args.batch_size)
                resume_s = time.perf_counter() - started
                assert result.skipped == args.n, result
                print(f"resume    the same .npz again (all skipped):   {args.n:>9} in {resume_s:7.2f} s = {args.n / resume_s:9.0f} templates/s")
        finally:
            process.terminate()
            process.wait(60)
    print(load())


if __name__ == "__main__":
    main()

"""End-to-end check of issue 3: the real ``facegallery serve`` process, the default dlib model,
real photos, driven through the public client and the CLI.

One photo per person of ``../shared/faces/face_recognition`` and ``../shared/faces/deepface`` is
enrolled, except three held-out people; every other photo of an enrolled person must be
identified as that person, every photo of a held-out person must come back unknown, and the
group photos of ``../shared/faces/_multi`` must give one answer per face (as many faces as dlib
itself found, ``golden_dlib/golden.jsonl``). Finally ``facegallery import`` enrolls a
folder-per-identity tree and a second run skips everything.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from server_process import facegallery_command, free_port, stop

from facegallery.client import DeadlineExceeded, GalleryClient

pytestmark = pytest.mark.slow

SOURCES = ("face_recognition", "deepface")
N_HELD_OUT = 3
#: dlib's decision threshold (L2 distance) for its ResNet embedding (dlib's
#: dnn_face_recognition_ex.cpp: "faces ... less than 0.6 apart are the same person").
THRESHOLD = 0.6

#: Folder names shared by the two sources. MANIFEST.csv says identity names are per source, so a
#: shared name is merged into one identity only when it is known to be the same person:
#: face_recognition's elon_musk/test_unknown_elon_musk.jpg is a resized copy of deepface's
#: elon_musk/img18.jpg (dlib's descriptors of the two are 0.05 apart, golden.jsonl).
MERGED_ACROSS_SOURCES = {"elon_musk"}

#: Probes whose label MANIFEST.csv does not vouch for, with the reason. They are still
#: identified, but only required not to be taken for somebody *else* (unknown or the labelled
#: person both pass); the test asserts that dlib's own descriptors back the exception.
UNVERIFIED_PROBES = {
    # MANIFEST: from an unmerged face_recognition PR, "wearing sunglasses; identity inferred
    # visually". dlib's descriptors put it 0.70-0.78 from every other Obama photo: dlib itself
    # does not recognise this face at its threshold.
    "face_recognition/barack_obama/Frame6_sunglasses.jpg": "barack_obama",
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The test's split of the shared photos (paths relative to ``faces/`` as in MANIFEST.csv)."""

    faces_dir: Path
    photos: dict[str, list[str]]  # identity -> its photos, sorted
    enrollment: dict[str, str]  # enrolled identity -> its enrollment photo
    held_out: tuple[str, ...]
    group_photos: dict[str, tuple[int, tuple[str, ...]]]  # path -> (dlib's face count, listed people)


def _area(face: dict) -> int:
    """Box area in square pixels of a golden.jsonl face (inclusive rectangle)."""
    left, top, right, bottom = face["rect"]
    return (right - left + 1) * (bottom - top + 1)


def _largest_face(record: dict) -> dict:
    return max(record["faces"], key=_area)


def _dataset(shared_dir: Path, golden: list[dict]) -> Dataset:
    faces_dir = shared_dir / "faces"
    by_path = {record["image"]: record for record in golden}
    photos: dict[str, list[str]] = defaultdict(list)
    names_by_source = {}
    for source in SOURCES:
        folders = sorted(p for p in (faces_dir / source).iterdir() if p.is_dir())
        names_by_source[source] = {p.name for p in folders}
        for folder in folders:
            photos[folder.name] += [f"{source}/{folder.name}/{f.name}" for f in sorted(folder.iterdir())]
    shared_names = set.intersection(*names_by_source.values())
    assert shared_names == MERGED_ACROSS_SOURCES, f"new folder names shared across sources: {shared_names}"

    with (faces_dir / "MANIFEST.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["path"].startswith("_multi/")]
    # "a+b" lists the people of a group photo; "unknown_group" has no per-face labels.
    group_photos = {
        row["path"]: (
            len(by_path[row["path"]]["faces"]),
            tuple(row["identity"].split("+")) if "+" in row["identity"] else (),
        )
        for row in rows
    }
    in_groups = {person for _, people in group_photos.values() for person in people}
    # Held out: the people with the most photos (the strongest "unknown" check), taken among those
    # in no group photo so that every named person of a group photo stays enrolled.
    candidates = sorted((p for p in photos if p not in in_groups), key=lambda p: (-len(photos[p]), p))
    held_out = tuple(sorted(candidates[:N_HELD_OUT]))
    # Enrollment photo: the one whose largest face is biggest in dlib's own detections (the most
    # detailed face; first in path order on a tie), never an unverified probe.
    enrollment = {
        identity: max(
            (p for p in paths if p not in UNVERIFIED_PROBES),
            key=lambda p: (_area(_largest_face(by_path[p])), [-ord(c) for c in p]),
        )
        for identity, paths in photos.items()
        if identity not in held_out
    }
    return Dataset(faces_dir, dict(photos), enrollment, held_out, group_photos)


@pytest.fixture(scope="module")
def dataset(shared_dir: Path, golden: list[dict]) -> Dataset:
    return _dataset(shared_dir, golden)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir) -> str:
    """A ``facegallery serve`` process on a free port; yields its address once SERVING."""
    base = tmp_path_factory.mktemp("integration")
    port = free_port()
    log_path = base / "server.log"
    command = facegallery_command() + [
        "serve", "--port", str(port), "--data-dir", str(base / "data"), "--model-dir", str(model_dir),
    ]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    address = f"localhost:{port}"
    try:
        with GalleryClient(address) as client:
            for _ in range(120):  # up to ~4 minutes: a first start may convert the dlib model
                if process.poll() is not None:
                    pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    client.wait_ready(2.0)
                    break
                except DeadlineExceeded:
                    continue
            else:
                pytest.fail(f"the server did not become ready:\n{log_path.read_text()[-3000:]}")
        yield address
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(server: str):
    with GalleryClient(server, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="module")
def enrolled(client: GalleryClient, dataset: Dataset) -> dict:
    return {
        identity: client.enroll(identity, dataset.faces_dir / path, metadata={"source": path})
        for identity, path in sorted(dataset.enrollment.items())
    }


def _identify_all(client: GalleryClient, dataset: Dataset, paths: list[str]) -> dict[str, list]:
    """``client.identify`` of every path, one at a time (the server's onnxruntime sessions
    already use every core; concurrent calls only oversubscribe them)."""
    return {p: client.identify(dataset.faces_dir / p) for p in paths}


def test_the_split_is_sound(dataset: Dataset, golden: list[dict]):
    assert len(dataset.held_out) == N_HELD_OUT and not set(dataset.held_out) & set(dataset.enrollment)
    assert set(dataset.held_out) | set(dataset.enrollment) == set(dataset.photos)
    # The unverified probes' exception must stay backed by dlib's own descriptors.
    descriptor = {r["image"]: np.asarray(_largest_face(r)["descriptor"]) for r in golden if r["faces"]}
    for probe, identity in UNVERIFIED_PROBES.items():
        others = [p for p in dataset.photos[identity] if p != probe]
        distances = [float(np.linalg.norm(descriptor[probe] - descriptor[p])) for p in others]
        assert min(distances) > THRESHOLD, f"{probe} is recognisable by dlib: check it like any other probe"


def test_one_photo_per_person_is_enrolled(client: GalleryClient, dataset: Dataset, enrolled: dict):
    for identity, result in enrolled.items():
        assert result.identity_id == identity and result.identity_created
        left, top, right, bottom = result.face.box
        assert 0 <= right - left and 0 <= bottom - top and len(result.face.landmarks) == 5
    listed = {i.identity_id: i.template_count for i in client.list_identities()}
    assert listed == {identity: 1 for identity in dataset.enrollment}
    duplicates = sorted((k, r.possible_duplicate.identity_id) for k, r in enrolled.items() if r.possible_duplicate)
    print(f"\nenrolled {len(enrolled)} people, held out {', '.join(dataset.held_out)}; "
          f"possible-duplicate warnings: {duplicates}")  # fmt: skip


def test_every_other_photo_of_an_enrolled_person_is_identified(client: GalleryClient, dataset: Dataset, enrolled: dict):
    probes = {p: i for i in sorted(enrolled) for p in dataset.photos[i] if p != dataset.enrollment[i]}
    wrong, correct, unverified = [], 0, []
    for path, faces in _identify_all(client, dataset, list(probes)).items():
        identity = probes[path]
        answer = faces[0].identity_id if faces else "<no face>"  # largest face first
        if path in UNVERIFIED_PROBES:
            unverified.append((path, answer, faces[0].distance if faces else None))
            if answer not in (None, identity):
                wrong.append((path, identity, answer))
        elif answer == identity:
            correct += 1
        else:
            wrong.append((path, identity, answer, faces[0].distance if faces else None))
    print(f"\nidentified {correct} probes correctly; unverified probes (path, answer, distance): {unverified}")
    assert wrong == []
    assert correct == sum(len(dataset.photos[i]) - 1 for i in enrolled) - len(UNVERIFIED_PROBES)


def test_every_photo_of_a_held_out_person_is_unknown(client: GalleryClient, dataset: Dataset, enrolled: dict):
    paths = [p for identity in dataset.held_out for p in dataset.photos[identity]]
    answers = {}
    for path, faces in _identify_all(client, dataset, paths).items():
        assert faces, f"no face found in {path}"
        answers[path] = [(f.identity_id, round(f.distance, 3)) for f in faces]
    taken_for_someone = {p: a for p, a in answers.items() if any(identity for identity, _ in a)}
    nearest = min(d for a in answers.values() for _, d in a)
    print(f"\n{len(answers)} held-out photos, all unknown; nearest enrolled distance {nearest:.3f}")
    assert taken_for_someone == {}


def test_group_photos_give_one_answer_per_face(client: GalleryClient, dataset: Dataset, enrolled: dict):
    summary = {}
    for path, (n_faces, people) in sorted(dataset.group_photos.items()):
        faces = client.identify(dataset.faces_dir / path)
        assert len(faces) == n_faces, f"{path}: {len(faces)} faces, dlib found {n_faces}"
        areas = [f.face.area for f in faces]
        # Largest face first; two faces of equal size (to 0.1 %) may come in either order.
        assert all(a >= b * 0.999 for a, b in zip(areas, areas[1:])), areas
        named = {f.identity_id for f in faces} - {None}
        summary[path] = (len(faces), sorted(named))
        if people:  # labelled photo: every enrolled person in it is found, nobody else
            assert named == set(people) & set(enrolled), path
    print(f"\ngroup photos (faces, identified): {summary}")


def test_verify_and_compare_on_real_photos(client: GalleryClient, dataset: Dataset, enrolled: dict):
    person = "joe_biden"
    probe = next(p for p in dataset.photos[person] if p != dataset.enrollment[person])
    verified = client.verify(person, dataset.faces_dir / probe)
    assert verified.is_match and verified.distance <= verified.threshold == pytest.approx(THRESHOLD)
    stranger = dataset.faces_dir / dataset.photos[dataset.held_out[0]][0]
    assert not client.verify(person, stranger).is_match
    compared = client.compare(dataset.faces_dir / probe, stranger)
    assert not compared.is_match and compared.distance > THRESHOLD


def test_folder_import_is_resumable(server: str, client: GalleryClient, dataset: Dataset, tmp_path: Path):
    # A folder-per-identity copy (symlinks) of the face_recognition people with at most 3 photos,
    # a subset that keeps this module's run time reasonable on 2 cores.
    root = tmp_path / "people"
    source = dataset.faces_dir / "face_recognition"
    count = 0
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and len(list(p.iterdir())) <= 3):
        (root / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir()):
            (root / folder.name / photo.name).symlink_to(photo)
            count += 1
    client.create_gallery("imported")
    command = facegallery_command() + ["import", str(root), "--server", server, "--gallery", "imported", "--json"]

    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"enrolled": count, "skipped": 0, "failed": 0, "failures": []}
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"enrolled": 0, "skipped": count, "failed": 0, "failures": []}

    gallery = client.get_gallery("imported")
    assert (gallery.identity_count, gallery.template_count) == (len(list(root.iterdir())), count)
    print(f"\nimport: {count} photos of {gallery.identity_count} people enrolled, then all {count} skipped")

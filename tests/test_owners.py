"""TemplateOwners (owners.py) against a plain dict, through appends, merges, removals and compaction."""

import numpy as np

from facegallery.server.gallery.owners import NO_OWNER, TemplateOwners


def test_owners_follow_a_dict_through_adds_and_removes():
    rng = np.random.default_rng(0)
    truth: dict[int, int] = {}
    owners = TemplateOwners(np.zeros(0, np.int64), np.zeros(0, np.int64))
    next_id = 1
    for step in range(300):
        if rng.random() < 0.6 or not truth:
            n = int(rng.integers(1, 50))
            if step % 7 == 0 and truth:  # ids below the largest held: merged, not appended
                ids = np.setdiff1d(rng.integers(1, next_id, n), list(truth))
            else:
                ids = np.arange(next_id, next_id + n)
                next_id += n
            keys = rng.integers(0, 40, len(ids))
            owners.add(ids, keys)
            truth.update(zip(ids.tolist(), keys.tolist()))
        else:
            gone = rng.choice(list(truth), size=min(len(truth), int(rng.integers(1, 60))), replace=False)
            owners.remove(np.concatenate([gone, [next_id + 10**6]]))  # an id never held is ignored
            for t in gone.tolist():
                del truth[t]
        assert len(owners) == len(truth)
        probe = rng.integers(-1, next_id + 5, (3, 20))
        expected = np.vectorize(lambda t: truth.get(int(t), NO_OWNER))(probe)
        np.testing.assert_array_equal(owners.identity_keys(probe), expected)


def test_reset_and_bad_input():
    owners = TemplateOwners(np.array([30, 10, 20]), np.array([3, 1, 2]))
    assert owners.identity_keys(np.array([10, 20, 30, 40, -1])).tolist() == [1, 2, 3, NO_OWNER, NO_OWNER]
    owners.remove(np.array([20, 20]))
    assert len(owners) == 2 and owners.identity_keys(np.array([20])).tolist() == [NO_OWNER]
    owners.reset(np.array([5]), np.array([9]))
    assert len(owners) == 1 and owners.identity_keys(np.array([5, 10])).tolist() == [9, NO_OWNER]
    try:
        owners.add(np.array([1, 2]), np.array([1]))
    except ValueError as e:
        assert "2 template ids for 1 identity keys" in str(e)
    else:
        raise AssertionError("mismatched arrays accepted")

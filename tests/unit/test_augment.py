import numpy as np

from recflm.augment import MASK, _augment_history, sample_negatives, row_uniforms
from recflm.config import AugmentConfig

IDS = np.array([str(i) for i in range(1, 101)], dtype=object)
HIST = [str(i) for i in range(1, 11)]


def aug(**on):
    base = dict(crop=0.0, mask=0.0, reorder=0.0, substitute=0.0)
    base.update(on)
    return AugmentConfig(**base)


def test_no_augmentation_keeps_history():
    assert _augment_history(HIST, np.random.default_rng(0), aug(), IDS, set(range(10))) == HIST


def test_crop_keeps_a_contiguous_window_of_at_least_half():
    for seed in range(20):
        out = _augment_history(HIST, np.random.default_rng(seed), aug(crop=1.0), IDS, set())
        assert len(out) >= 5
        start = HIST.index(out[0])
        assert out == HIST[start:start + len(out)]


def test_mask_reorder_substitute():
    rng = np.random.default_rng(1)
    masked = _augment_history(HIST, rng, aug(mask=1.0, mask_rate=0.5), IDS, set())
    assert MASK in masked and len(masked) == len(HIST)
    reordered = _augment_history(HIST, np.random.default_rng(2), aug(reorder=1.0, reorder_window=3), IDS, set())
    assert sorted(reordered, key=int) == HIST and sum(a != b for a, b in zip(reordered, HIST)) <= 3
    seen = set(range(10))  # catalog indices of HIST
    for seed in range(20):
        sub = _augment_history(HIST, np.random.default_rng(seed), aug(substitute=1.0), IDS, seen)
        new = [x for x in sub if x not in HIST]
        assert len(new) == 1 and int(new[0]) > 10  # the noise item is never one of the user's items


def test_negatives_avoid_seen_items():
    rng = np.random.default_rng(0)
    neg = sample_negatives(rng, 100, set(range(50)), 30)
    assert len(neg) == 30 and len(set(neg)) == 30 and min(neg) >= 50
    assert len(sample_negatives(rng, 10, set(range(8)), 5)) == 2  # only two items left


def test_row_uniforms_are_pure_functions_of_the_key():
    keys = np.array(["u1|a", "u2|b", "u1|a"], dtype=object)
    a = row_uniforms(keys, 7, 0, "train", 3)
    assert a.shape == (3, 3) and ((a >= 0) & (a < 1)).all()
    assert (a[0] == a[2]).all() and not (a[0] == a[1]).all()
    assert (row_uniforms(keys[:1], 7, 0, "train", 3) == a[:1]).all()
    assert not (row_uniforms(keys, 7, 1, "train", 3) == a).all()

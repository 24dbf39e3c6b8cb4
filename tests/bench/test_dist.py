import random

import pytest

from selfhost.bench.dist import LengthDist, parse_length_dist
from selfhost.errors import InvalidParameterError


@pytest.mark.parametrize(
    "text, kind, low, high",
    [("256", "fixed", 256, 256), ("fixed:7", "fixed", 7, 7), ("uniform:64-512", "uniform", 64, 512),
     ("normal:256,64", "normal", 256, 64), (" Uniform: 1 - 2 ", "uniform", 1, 2)],
)
def test_parse_forms(text, kind, low, high):
    assert parse_length_dist(text) == LengthDist(kind, low, high)


@pytest.mark.parametrize("text", ["", "zipf:3", "uniform:5", "uniform:9-3", "fixed:0", "normal:0,1", "fixed:x"])
def test_bad_specs_name_the_value(text):
    with pytest.raises(InvalidParameterError) as err:
        parse_length_dist(text)
    assert repr(text) in str(err.value) or text.split(":")[-1] in str(err.value)


def test_samples_stay_in_range_and_follow_the_seed():
    for spec in ("fixed:5", "uniform:3-9", "normal:20,8"):
        dist = parse_length_dist(spec)
        draws = [dist.sample(random.Random(1)) for _ in range(3)]
        assert len(set(draws)) == 1  # same seed, same draw
        values = [dist.sample(rng) for rng in [random.Random(0)] for _ in range(2000)]
        assert min(values) >= 1
        if dist.kind == "uniform":
            assert set(values) == set(range(3, 10))
        if dist.kind == "normal":
            assert max(values) <= 20 + 4 * 8
            assert abs(sum(values) / len(values) - 20) < 1.0
    assert str(parse_length_dist("uniform:3-9")) == "uniform:3-9"

import json

import pytest

from selfhost.bench.dist import parse_length_dist
from selfhost.bench.workload import DatasetError, dataset_workload, synthetic_workload
from selfhost.errors import InvalidParameterError

OUT = parse_length_dist("uniform:4-16")


def test_synthetic_is_reproducible_and_sized():
    prompt = parse_length_dist("uniform:10-50")
    a = synthetic_workload(20, prompt, OUT, seed=3)
    b = synthetic_workload(20, prompt, OUT, seed=3)
    c = synthetic_workload(20, prompt, OUT, seed=4)
    assert a == b
    assert a.requests != c.requests
    for request in a.requests:
        (role, text), = request.messages
        assert role == "user"
        assert len(text.split()) == request.planned_prompt_tokens  # one word per planned token
        assert 4 <= request.max_tokens <= 16
    assert a.describe() == "prompt=uniform:10-50 output=uniform:4-16 n=20 seed=3"


def test_levels_get_fresh_prompts_of_the_same_lengths(tmp_path):
    prompt = parse_length_dist("uniform:10-50")
    workload = synthetic_workload(6, prompt, OUT, seed=1, num_levels=3)
    assert workload.requests == synthetic_workload(6, prompt, OUT, seed=1).requests
    texts = [{r.messages for r in level} for level in workload.per_level]
    assert not (texts[0] & texts[1]) and not (texts[1] & texts[2])  # nothing for a prefix cache to reuse
    shapes = {tuple((r.planned_prompt_tokens, r.max_tokens) for r in level) for level in workload.per_level}
    assert len(shapes) == 1

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(10)))
    levels = dataset_workload(path, 4, OUT, seed=0, num_levels=3).per_level
    assert len({r.messages for level in levels[:2] for r in level}) == 8  # disjoint while the file lasts
    assert [r.max_tokens for r in levels[0]] == [r.max_tokens for r in levels[2]]


def test_requests_must_be_positive():
    with pytest.raises(InvalidParameterError, match="-1"):
        synthetic_workload(-1, OUT, OUT)


def test_dataset_shapes(tmp_path):
    records = [
        {"prompt": "plain prompt"},
        {"text": "text key", "max_tokens": 3},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q1"},
                           {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},  # unusable, skipped
        {"unknown": 1},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    workload = dataset_workload(path, 8, OUT, seed=0)
    assert len(workload.requests) == 8
    seen = {request.messages for request in workload.requests}
    assert seen == {
        (("user", "plain prompt"),),
        (("user", "text key"),),
        (("system", "be brief"), ("user", "hi")),
        (("system", "sys"), ("user", "q1")),  # ShareGPT: up to the first human turn
    }
    assert all(r.max_tokens == 3 for r in workload.requests if r.messages == (("user", "text key"),))
    assert workload == dataset_workload(path, 8, OUT, seed=0)
    sharegpt = next(r for r in workload.requests if r.messages[0] == ("system", "sys"))
    assert sharegpt.prompt_text() == "system: sys\nuser: q1\nassistant:"


def test_dataset_json_array_and_errors(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hello"}]}]))
    assert dataset_workload(path, 2, OUT).requests[1].messages == (("user", "hello"),)
    with pytest.raises(DatasetError, match="missing.jsonl"):
        dataset_workload(tmp_path / "missing.jsonl", 1, OUT)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(DatasetError, match="line 2"):
        dataset_workload(bad, 1, OUT)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"other": 1}\n')
    with pytest.raises(DatasetError, match="no usable record"):
        dataset_workload(empty, 1, OUT)

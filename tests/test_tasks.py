"""The reasoning suite: deterministic, disjoint, balanced splits; gold steps that compute the answer; a tolerant scorer."""
import random
import re

import pytest

from edgedistill.data.tasks import (KINDS, NO_THINK_PREFIX, THINK_PREFIX, Problem, extract_answer, generate_suite,
                                    make_problem, read_jsonl, render_prompt, score, split_of, write_jsonl)
from edgedistill.errors import DataError


def test_splits_are_deterministic_disjoint_and_balanced():
    sizes = {"train": 200, "calib": 60, "test": 60}
    a, b = generate_suite(sizes, seed=3), generate_suite(sizes, seed=3)
    assert a == b and generate_suite(sizes, seed=4) != a
    qs = {s: {p.question for p in a[s]} for s in a}
    assert all(len(qs[s]) == sizes[s] for s in sizes)
    assert not (qs["train"] & qs["calib"]) and not (qs["train"] & qs["test"]) and not (qs["calib"] & qs["test"])
    for s, ps in a.items():
        assert all(split_of(p.question) == s for p in ps)
        cells = {(p.kind, p.difficulty) for p in ps}
        assert cells == {(k, d) for k in KINDS for d in range(1, 6)}
    assert len(generate_suite({"test": 7}, seed=0)["test"]) == 7


def _check_arithmetic(step: str) -> None:
    m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)( m per lap)?\.", step)
    if m:
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c, step


@pytest.mark.parametrize("kind", KINDS)
def test_gold_steps_are_right_and_get_longer_with_difficulty(kind):
    rng = random.Random(0)
    lengths = []
    for d in range(1, 6):
        ps = [make_problem(kind, d, rng) for _ in range(40)]
        for p in ps:
            for step in p.steps:
                _check_arithmetic(step)
            assert p.answer and p.steps
            assert score(p.target("on"), p.answer) and score(p.target("off"), p.answer)
        lengths.append(sum(len(p.steps) for p in ps) / len(ps))
    assert lengths[-1] > lengths[0]


def test_last_step_carries_the_answer_for_arithmetic():
    rng = random.Random(1)
    for _ in range(100):
        p = make_problem("arithmetic", 5, rng)
        assert p.steps[-1].endswith(f"= {p.answer}.")


@pytest.mark.parametrize("text, answer, ok", [
    ("<think>\n1 + 2 = 3.\n</think>\n\nAnswer: 3", "3", True),
    ("Answer: 3.0", "3", True),
    ("answer:  **1,2 , 3**.", "1, 2, 3", True),
    ("The answer is: Leo", "leo", True),
    ("<think>\nAnswer: 4\n</think>\n\nAnswer: 5", "4", False),     # only the answer after the think block counts
    ("<think>\n1 + 2 = 3.", "3", False),                           # cut inside the think block: no answer
    ("I think it is\n42", "42", True),                             # no Answer line: the last line
    ("", "1", False),
    ("Answer: 12:05", "12:05", True),
    ("Answer: 13", "3", False),
])
def test_scorer(text, answer, ok):
    assert score(text, answer) is ok


def test_extract_answer_takes_the_last_answer_line():
    assert extract_answer("Answer: 1\nwait\nAnswer: 2") == "2"


def test_jsonl_round_trip_and_bad_line(tmp_path):
    ps = generate_suite({"calib": 12}, seed=1)["calib"]
    write_jsonl(ps, tmp_path / "c.jsonl")
    assert read_jsonl(tmp_path / "c.jsonl") == ps
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_bad_arguments_name_what_was_wrong():
    with pytest.raises(DataError, match="kind"):
        make_problem("poetry", 1, random.Random(0))
    with pytest.raises(DataError, match="difficulty 6"):
        make_problem("logic", 6, random.Random(0))
    with pytest.raises(DataError, match="split"):
        generate_suite({"dev": 3})


def test_hybrid_samples_render_through_the_chat_template(tiny_tokenizer):
    p = Problem("x", "arithmetic", 2, "Mia has 2 coins. She gets 3 more. How many coins does Mia have now?", "5",
                ["Start with 2.", "2 + 3 = 5."])
    assert p.target("on") == "<think>\nStart with 2.\n2 + 3 = 5.\n</think>\n\nAnswer: 5"
    assert p.target("off") == "<think>\n\n</think>\n\nAnswer: 5"
    on, off = render_prompt(tiny_tokenizer, p.question, "on"), render_prompt(tiny_tokenizer, p.question, "off")
    assert on.endswith("<|im_start|>assistant\n" + THINK_PREFIX) and off.endswith(NO_THINK_PREFIX)
    full = tiny_tokenizer.apply_chat_template(p.chat("on")["messages"], tokenize=False)
    assert full.startswith(on) and "Answer: 5<|im_end|>" in full

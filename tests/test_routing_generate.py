"""The build answers the suite through the serving engine (batched); it must give what one sequence at a time gives."""
import pytest
from transformers import AutoTokenizer

from edgedistill.data.tasks import generate_suite
from edgedistill.export.llamacpp import LlamaCppModel
from edgedistill.data.tasks import NO_THINK_PREFIX, THINK_PREFIX
from edgedistill.routing.generate import answer, answer_groups, answer_many
from edgedistill.serve.engine import BatchEngine

BUDGET, ANSWER = 12, 5


@pytest.fixture(scope="module")
def problems():
    return generate_suite({"calib": 10}, seed=3)["calib"]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_batched_answers_match_one_sequence_at_a_time(tiny_f16_gguf, tiny_model_dir, problems, mode):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with LlamaCppModel(tiny_f16_gguf, n_ctx=1024) as model:
        ref = [answer(model, tok, p, mode, think_budget=BUDGET, answer_tokens=ANSWER) for p in problems]
    engine = BatchEngine(tiny_f16_gguf, slots=4, ctx_per_slot=512, max_queue=len(problems))
    done = []
    try:
        got = answer_many(engine, tok, problems, mode, think_budget=BUDGET, answer_tokens=ANSWER,
                          on_done=lambda: done.append(1))
    finally:
        engine.close()
    assert len(got) == len(problems) and len(done) == len(problems)
    same = [a.text == b.text for a, b in zip(ref, got)]
    # Batched decoding may flip a near-tie argmax of a random model now and then; nearly all must agree.
    assert sum(same) >= len(problems) - 1, [(a.text, b.text) for a, b in zip(ref, got) if a.text != b.text]
    for a, b in zip(ref, got):
        assert b.tokens == len(b.logprobs) <= BUDGET + ANSWER and b.seconds >= 0.0
        assert all(lp <= 1e-6 for lp in b.logprobs)
        if a.text == b.text:
            assert (a.tokens, a.think_tokens, a.budget_hit, a.correct) == (b.tokens, b.think_tokens, b.budget_hit,
                                                                            b.correct)
            assert b.logprobs == pytest.approx(a.logprobs, rel=2e-3, abs=5e-3)  # batch composition moves fp sums
        if mode == "on":
            assert b.think_tokens <= BUDGET


def test_groups_share_one_queue_and_give_each_group_its_answers(tiny_f16_gguf, tiny_model_dir, problems):
    """Groups in different modes go through one engine queue at once; each group's answers come back in input
    order, in its own mode, as if it had been asked alone."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = BatchEngine(tiny_f16_gguf, slots=4, ctx_per_slot=512, max_queue=3 * len(problems))
    try:
        alone = {m: answer_many(engine, tok, problems, m, think_budget=BUDGET, answer_tokens=ANSWER)
                 for m in ("on", "off")}
        off_a, on, off_b = answer_groups(engine, tok, [(problems, "off"), (problems, "on"), (problems[:3], "off")],
                                         think_budget=BUDGET, answer_tokens=ANSWER)
    finally:
        engine.close()
    assert (len(off_a), len(on), len(off_b)) == (len(problems), len(problems), 3)
    assert all(a.text.startswith(NO_THINK_PREFIX) for a in off_a + off_b)
    assert all(a.text.startswith(THINK_PREFIX) for a in on)
    for got, ref in ((off_a, alone["off"]), (on, alone["on"]), (off_b, alone["off"][:3])):
        same = sum(a.text == b.text for a, b in zip(got, ref))
        assert same >= len(ref) - 1, [(a.text, b.text) for a, b in zip(got, ref) if a.text != b.text]

"""Thinking switches and budgets: every dialect normalised to one setting (a table), conflicts and bad values as
400s naming the field, strict "off", and the thinking budget inserted mid-generation by the real batched engine."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from edgedistill.artifacts import file_record
from edgedistill.routing.policy import RoutingPolicy
from edgedistill.serve.app import create_app
from edgedistill.serve.backend import LlamaCppBackend, Prompt, pick_gguf
from edgedistill.serve.events import Delta, Finished, SamplingParams
from edgedistill.serve.schemas import ChatCompletionRequest
from edgedistill.serve.thinking import EFFORT_BUDGETS, PREFILL, STOP_THINKING, SwitchConflict, ThinkSplitter, resolve
from live_server import serving
from test_serve import write_manifest
from test_serve_api import THOUGHT, ScriptBackend

Q = [{"role": "user", "content": "What is 17 + 25?"}]


def setting(body: dict):
    req = ChatCompletionRequest(**{"messages": Q, **body})
    return resolve(req, [m.as_template_message() for m in req.messages])


# ---------------------------------------------------------------- the dialect table
@pytest.mark.parametrize("body, mode, budget, source", [
    ({}, "auto", None, "default"),
    ({"reasoning_effort": "none"}, "off", None, "reasoning_effort"),
    ({"reasoning_effort": "minimal"}, "on", EFFORT_BUDGETS["minimal"], "reasoning_effort"),
    ({"reasoning_effort": "low"}, "on", EFFORT_BUDGETS["low"], "reasoning_effort"),
    ({"reasoning_effort": "medium"}, "on", EFFORT_BUDGETS["medium"], "reasoning_effort"),
    ({"reasoning_effort": "high"}, "on", EFFORT_BUDGETS["high"], "reasoning_effort"),
    ({"chat_template_kwargs": {"enable_thinking": True}}, "on", None, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": {"enable_thinking": False, "other": 1}}, "off", None,
     "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": {"other": 1}}, "auto", None, "default"),
    ({"think": True}, "on", None, "think"),
    ({"think": False}, "off", None, "think"),
    ({"think": "high"}, "on", EFFORT_BUDGETS["high"], "think"),
    ({"thinking": {"type": "enabled"}}, "on", None, "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 99}}, "on", 99, "thinking"),
    ({"thinking": {"type": "disabled"}}, "off", None, "thinking"),
    ({"thinking": {"type": "auto", "budget_tokens": 40}}, "auto", 40, "thinking"),
    # agreeing switches: fine; an explicit budget beats a level's
    ({"think": True, "chat_template_kwargs": {"enable_thinking": True}}, "on", None,
     "chat_template_kwargs.enable_thinking+think"),
    ({"reasoning_effort": "low", "thinking": {"type": "enabled", "budget_tokens": 7}}, "on", 7,
     "reasoning_effort+thinking"),
    ({"reasoning_effort": "low", "think": "low"}, "on", EFFORT_BUDGETS["low"], "reasoning_effort+think"),
    ({"reasoning_effort": "none", "thinking": {"type": "auto", "budget_tokens": 7}}, "off", None,
     "reasoning_effort+thinking"),
    # in-message tags: soft switches, removed from the prompt; request fields win over them
    ({"messages": [{"role": "user", "content": "hi /think"}]}, "on", None, "/think"),
    ({"messages": [{"role": "system", "content": "/think"}, {"role": "user", "content": "hi /no_think"}]},
     "off", None, "/no_think"),
    ({"messages": [{"role": "user", "content": "/no_think hi"}], "think": "low"}, "on", EFFORT_BUDGETS["low"],
     "think"),
    ({"messages": [{"role": "user", "content": "see /thinker and a/think"}]}, "auto", None, "default"),
])
def test_every_switch_normalises_to_one_setting(body, mode, budget, source):
    s, messages = setting(body)
    assert (s.mode, s.budget, s.source) == (mode, budget, source)
    assert all("/think" not in m["content"].split() and "/no_think" not in m["content"].split() for m in messages)


def test_tags_are_removed_from_the_prompt_and_the_latest_wins():
    s, messages = setting({"messages": [{"role": "user", "content": "a /think  b"},
                                        {"role": "assistant", "content": "ok /no_think"},
                                        {"role": "user", "content": "c /no_think"}]})
    assert s.mode == "off" and [m["content"] for m in messages] == ["a b", "ok /no_think", "c"]


@pytest.mark.parametrize("body, param, words", [
    ({"think": True, "reasoning_effort": "none"}, "reasoning_effort", ["think", "reasoning_effort"]),
    ({"chat_template_kwargs": {"enable_thinking": False}, "thinking": {"type": "enabled"}},
     "chat_template_kwargs.enable_thinking", ["thinking", "enable_thinking"]),
    ({"reasoning_effort": "low", "think": "high"}, "reasoning_effort", ["reasoning_effort", "think", "256", "4096"]),
])
def test_conflicting_switches_name_both_fields(body, param, words):
    with pytest.raises(SwitchConflict) as e:
        setting(body)
    assert e.value.param == param and all(w in str(e.value) for w in words)


# ---------------------------------------------------------------- through the server: 400s, strict off, the object
@pytest.fixture(scope="module")
def script_url(tmp_path_factory):
    backend = ScriptBackend(THOUGHT)
    with serving(create_app(tmp_path_factory.mktemp("s"), backend=backend)) as url:
        yield url


@pytest.mark.parametrize("extra, param", [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"think": "yes"}, "think"),
    ({"think": 1}, "think"),
    ({"chat_template_kwargs": {"enable_thinking": "true"}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": "on"}, "chat_template_kwargs"),
    ({"thinking": {"type": "on"}}, "thinking.type"),
    ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": "many"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "disabled", "budget_tokens": 5}}, "thinking"),
    ({"thinking": True}, "thinking"),
    ({"think": True, "reasoning_effort": "none"}, "reasoning_effort"),
])
def test_bad_switch_is_a_400_naming_the_field(script_url, extra, param):
    oa = openai.OpenAI(base_url=f"{script_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="echo", messages=Q, extra_body=extra)
    err = e.value.response.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param.split(".")[-1] in err["message"]


def test_strict_off_drops_think_text_the_model_writes_anyway(script_url):
    """The scripted model thinks regardless; with an explicit off none of it reaches content or reasoning."""
    oa = openai.OpenAI(base_url=f"{script_url}/v1", api_key="x", max_retries=0)
    for off in ({"reasoning_effort": "none"}, {"think": False}, {"chat_template_kwargs": {"enable_thinking": False}}):
        r = oa.chat.completions.create(model="echo", messages=Q, extra_body=off)
        msg = r.choices[0].message
        assert msg.content == "It is 4." and msg.model_extra.get("reasoning") is None
        assert r.model_extra["edgedistill"]["think_mode"] == "off"
        chunks = list(oa.chat.completions.create(model="echo", messages=Q, extra_body=off, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "It is 4."
        assert not any((d.model_extra or {}).get("reasoning") for d in deltas)
    # Not asked to be off: the same text's thoughts come back as reasoning.
    msg = oa.chat.completions.create(model="echo", messages=Q).choices[0].message
    assert (msg.content, msg.model_extra["reasoning"]) == ("It is 4.", "Two and two")


@pytest.mark.parametrize("text, inside, reasoning, content", [
    ("<think>a</think>\n\nb", False, "a", "b"),
    ("a</think>\n\nb", True, "a", "b"),
    ("<think>a</think>b", True, "a", "b"),  # a remote model re-sending the opening tag
    ("b</think> c", False, "", "b c"),  # a stray closing tag in the answer is dropped
    ("x<think>y", False, "y", "x"),
])
def test_splitter_handles_prefilled_and_stray_tags(text, inside, reasoning, content):
    for step in (1, 3, len(text)):  # tags split across deltas
        s = ThinkSplitter(inside=inside)
        parts = [s.feed(text[i:i + step]) for i in range(0, len(text), step)] + [s.flush()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (reasoning, content)


# ---------------------------------------------------------------- the real engine: budgets and prefills
@pytest.fixture(scope="module")
def build_dir(tmp_path_factory, tiny_model_dir):
    from edgedistill.export.gguf import write_gguf

    out = tmp_path_factory.mktemp("builds") / "think-build"
    gguf = out / "export" / "student-f16.gguf"
    gguf.parent.mkdir(parents=True)
    write_gguf(tiny_model_dir, gguf, dtype="f16")
    write_manifest(out, [file_record(out, gguf)])
    return out


def run_job(backend: LlamaCppBackend, prompt: Prompt, params: SamplingParams) -> tuple[str, Finished, int]:
    done, parts, result = threading.Event(), [], []

    def emit(ev):
        if isinstance(ev, Delta):
            parts.append(ev.text)
        else:
            result.append(ev)
            done.set()
    backend.start(prompt, params, emit)
    assert done.wait(60)
    return "".join(parts), result[0], len(parts)


def test_budget_inserts_the_stop_sentence_mid_generation(build_dir):
    """Thinking stops at the budget: the engine feeds the stop sentence and </think> into the running sequence
    (next to another sequence that keeps going), and the model then answers."""
    backend = LlamaCppBackend(pick_gguf(build_dir), slots=2, ctx_per_slot=256, n_threads=1)
    try:
        prompt = Prompt(messages=tuple(Q), prefix=PREFILL["on"])
        assert backend.engine.model.detokenize(backend.render(prompt), special=True).decode().endswith(
            "<|im_start|>assistant\n<think>\n")
        budget = 6
        params = SamplingParams(max_tokens=80, temperature=0.0, logprobs=True, think_open=True, think_budget=budget)
        other = []
        backend.start(Prompt(messages=tuple(Q)), SamplingParams(max_tokens=40, temperature=0.0), other.append)
        text, fin, _ = run_job(backend, prompt, params)
        assert fin.budget_hit and fin.thinking_tokens == budget
        thought, sep, answer = text.partition(STOP_THINKING)
        assert sep and "</think>" not in thought and answer  # it went on answering after the inserted tokens
        inserted = len(backend.engine.tokenize(STOP_THINKING, add_bos=False))
        assert fin.completion_tokens == len(fin.token_logprobs) + inserted  # inserted tokens have no log-probs
        assert all(lp <= 0 for lp in fin.token_logprobs)
        # The inserted tokens are really in the sequence: the same text fed as a prompt continues identically.
        again, fin2, _ = run_job(backend, Prompt(messages=tuple(Q), prefix=PREFILL["on"] + thought + STOP_THINKING),
                                 SamplingParams(max_tokens=4, temperature=0.0, logprobs=True))
        assert answer.startswith(again) and not fin2.budget_hit
        # Without a budget nothing is inserted.
        free, fin3, _ = run_job(backend, prompt, SamplingParams(max_tokens=20, temperature=0.0, think_open=True))
        assert STOP_THINKING not in free and not fin3.budget_hit and fin3.thinking_tokens == fin3.completion_tokens
    finally:
        backend.close()


@pytest.fixture(scope="module")
def served(build_dir):
    policy = RoutingPolicy(calibrated=True)  # never thinks on its own: auto means off, prefilled
    with serving(create_app(build_dir, max_tokens_cap=64, slots=2, ctx_per_slot=256, n_threads=1,
                            policy=policy)) as url:
        yield url


def test_budget_through_the_server_streamed_and_not(served):
    oa = openai.OpenAI(base_url=f"{served}/v1", api_key="x", max_retries=0, timeout=60)
    kw = dict(model="think-build", messages=Q, max_tokens=40, temperature=0,
              extra_body={"thinking": {"type": "enabled", "budget_tokens": 5}})
    before = httpx.get(f"{served}/metrics").text
    assert "edgedistill_think_budget_hits_total 0" in before
    raw = httpx.post(f"{served}/v1/chat/completions", json={**{k: v for k, v in kw.items() if k != "extra_body"},
                                                             **kw["extra_body"]}, timeout=60)
    r = raw.json()
    ed = r["edgedistill"]
    assert (ed["think_mode"], ed["think_budget"], ed["budget_hit"], ed["thinking_tokens"]) == ("on", 5, True, 5)
    assert ed["think_requested"] == "on" and ed["think_source"] == "thinking" and not ed["escalated"]
    assert raw.headers["x-edgedistill-budget-hit"] == "true" and raw.headers["x-edgedistill-think-mode"] == "on"
    msg = r["choices"][0]["message"]
    assert msg["reasoning"].endswith(STOP_THINKING.split("</think>")[0]) and "<think>" not in msg["content"]
    assert "</think>" not in msg["content"] and "</think>" not in msg["reasoning"]
    chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == msg["content"]
    assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == msg["reasoning"]
    last = chunks[-1].model_extra["edgedistill"]
    assert last["budget_hit"] and last["thinking_tokens"] == 5 and chunks[-1].usage.completion_tokens > 5
    assert "edgedistill_think_budget_hits_total 2" in httpx.get(f"{served}/metrics").text


def test_off_prefills_an_empty_think_block_and_on_opens_one(served):
    oa = openai.OpenAI(base_url=f"{served}/v1", api_key="x", max_retries=0, timeout=60)
    off = oa.chat.completions.create(model="think-build", messages=Q, max_tokens=12, temperature=0,
                                     extra_body={"reasoning_effort": "none"})
    auto = oa.chat.completions.create(model="think-build", messages=Q, max_tokens=12, temperature=0)
    assert off.model_extra["edgedistill"]["think_mode"] == auto.model_extra["edgedistill"]["think_mode"] == "off"
    assert off.choices[0].message.content == auto.choices[0].message.content  # both: the same empty think block
    assert "<think>" not in off.choices[0].message.content and off.choices[0].message.model_extra["reasoning"] is None
    assert auto.model_extra["edgedistill"]["think_requested"] == "auto"
    on = oa.chat.completions.create(model="think-build", messages=[{"role": "user", "content": "17 + 25? /think"}],
                                    max_tokens=12, temperature=0)
    ed = on.model_extra["edgedistill"]
    assert (ed["think_mode"], ed["think_source"], ed["thinking_tokens"]) == ("on", "/think", on.usage.completion_tokens)
    assert on.choices[0].message.content == "" and on.choices[0].message.model_extra["reasoning"]
    metrics = httpx.get(f"{served}/metrics").text
    assert 'edgedistill_think_requests_total{mode="off",decided_by="policy"}' in metrics
    assert 'edgedistill_think_requests_total{mode="on",decided_by="request"}' in metrics


@pytest.mark.parametrize("pieces, inside, counts, final", [
    # (token texts, starts inside, thinking tokens after each token, inside at the end)
    (["<think>", "a", "</think>", "b"], False, [1, 2, 3, 3], False),
    (["<th", "ink>a", "</", "think>", " b"], False, [0, 1, 2, 3, 3], False),  # tags split across tokens
    (["a", "b</think>\n", "c"], True, [1, 2, 2], False),  # the prompt opened the block
    (["x</think>", "<think>y"], False, [0, 1], True),  # a stray closing tag outside the block is not a boundary
])
def test_tracker_counts_thinking_tokens_as_the_engine_does(pieces, inside, counts, final):
    from edgedistill.serve.thinking import ThinkTracker

    t, text, seen = ThinkTracker(inside=inside), "", []
    for p in pieces:
        text += p
        t.token(text)
        seen.append(t.thinking_tokens)
    assert seen == counts and t.inside is final and not t.over_budget


def test_tracker_budget_and_inserted_text_stream():
    """Over budget only inside the block; once the backend wrote STOP_THINKING its `</think>` is not read again,
    and the stream never looks for stop strings in the inserted text."""
    from edgedistill.serve.detok import TextStream
    from edgedistill.serve.thinking import ThinkTracker

    t = ThinkTracker(inside=True, budget=2)
    t.token("a")
    assert not t.over_budget
    t.token("ab")
    assert t.over_budget
    text = "ab" + STOP_THINKING
    t.closed_by_backend(len(text))
    t.token(text + "c")
    assert (t.inside, t.budget_hit, t.thinking_tokens, t.over_budget) == (False, True, 2, False)
    vocab = {0: "ab", 1: STOP_THINKING, 2: "ok", 3: " answer"}
    sent = []
    s = TextStream(lambda toks: "".join(vocab[i] for i in toks), ("answer",), sent.append)
    assert not s.push(0)
    s.insert([1])  # contains "answer": not a stop
    assert sent[-1] == Delta(STOP_THINKING, 1) and s.text == "ab" + STOP_THINKING
    assert not s.push(2) and s.push(3)
    assert "".join(d.text for d in sent) == "ab" + STOP_THINKING + "ok "

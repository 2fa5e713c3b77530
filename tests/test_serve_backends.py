"""`edgedistill serve --backend llamacpp|onnx|transformers`, `--device`, `--workers`: each backend behind the real
uvicorn server, driven by the official `openai` client, on a tiny build (GGUF + KV-cache ONNX + model folder)."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from edgedistill.artifacts import MANIFEST, atomic_write_json, file_record
from edgedistill.errors import ServeError
from edgedistill.serve.app import create_app
from edgedistill.serve.backend import Prompt, generate
from edgedistill.serve.events import Delta, SamplingParams
from edgedistill.serve.select import open_backend, plan_serving
from edgedistill.serve.thinking import PREFILL, STOP_THINKING
from live_server import serving

NAME = "tiny-build"
PI = "raspberry-pi-5-8gb"
USER = [{"role": "user", "content": "def add(a, b):"}]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def build(tmp_path_factory, tiny_model_dir) -> Path:
    """A build folder as `edgedistill build` leaves it: student/, export/ (GGUF f16 + KV-cache ONNX), manifest
    with a devices section for the Raspberry Pi (its choice placed in raspberry-pi-5-8gb/)."""
    from edgedistill.devices.plan import fit_build, place_for_device
    from edgedistill.export.gguf import write_gguf
    from edgedistill.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("builds") / NAME
    shutil.copytree(tiny_model_dir, out / "student")
    (out / "export").mkdir()
    write_gguf(tiny_model_dir, out / "export" / "student-f16.gguf", dtype="f16")
    export_onnx(tiny_model_dir, out / "export" / "student.onnx", graph="kv_cache")
    outputs = [file_record(out, p) for p in sorted((out / "export").iterdir())]
    manifest = {"stages": {"export": {"status": "done", "outputs": outputs}}}
    atomic_write_json(out / MANIFEST, manifest)
    report = fit_build(out, PI)
    place_for_device(out, report)
    manifest["stages"]["devices"] = {"status": "done", "outputs": [], "metrics": {PI: report}}
    atomic_write_json(out / MANIFEST, manifest)
    return out


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


# ---------------------------------------------------------------- every backend through the real server
@pytest.mark.parametrize("kind", ["llamacpp", "onnx", "transformers"])
def test_backend_serves_the_openai_api(build, kind):
    app = create_app(build, backend_kind=kind, slots=2, ctx_per_slot=256, n_threads=1, max_tokens_cap=32)
    assert app.state.service.backend.name == NAME
    with serving(app) as url:
        client = client_for(url)
        assert [m.id for m in client.models.list().data] == [NAME]
        resp = client.chat.completions.create(model=NAME, messages=USER, max_tokens=6, temperature=0)
        text = resp.choices[0].message.content
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert resp.usage.completion_tokens <= 6 and resp.usage.prompt_tokens > 5
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
        chunks = list(client.chat.completions.create(model=NAME, messages=USER, max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
        done = client.completions.create(model=NAME, prompt="import os\n", max_tokens=5, temperature=0)
        assert done.usage.completion_tokens <= 5
        # seeded sampling is reproducible; a stop string cuts the text before it
        sampled = [client.chat.completions.create(model=NAME, messages=USER, max_tokens=6, temperature=1.0,
                                                  seed=7).choices[0].message.content for _ in range(2)]
        assert sampled[0] == sampled[1]
        if len(text) > 3:
            stop = text[2:4]
            cut = client.chat.completions.create(model=NAME, messages=USER, max_tokens=6, temperature=0, stop=[stop])
            assert cut.choices[0].message.content == text[:text.find(stop)]
            assert cut.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x " * 400}], max_tokens=4)


def test_the_three_backends_agree_greedily(build):
    """The same weights greedily decoded by llama.cpp (f16), onnxruntime (fp32) and torch: the same first tokens."""
    texts = {}
    for kind in ("llamacpp", "onnx", "transformers"):
        b = open_backend(plan_serving(build, backend=kind, slots=1, ctx=256, threads=1))
        texts[kind] = generate(b, Prompt(messages=tuple(USER)), SamplingParams(max_tokens=4, temperature=0.0))[0]
        b.close()
    assert texts["onnx"] == texts["transformers"]
    assert texts["llamacpp"][:3] == texts["transformers"][:3], texts


def test_transformers_backend_batches_and_batching_does_not_change_text(build):
    from edgedistill.serve.torch_backend import TransformersBackend

    b = TransformersBackend(build / "student", slots=4, n_ctx=256, n_threads=1)
    prompts = [Prompt(messages=({"role": "user", "content": c},)) for c in ("def add(a, b):", "import os", "x", "y = [")]
    alone = [generate(b, p, GREEDY) for p in prompts]
    seen_active: list[int] = []
    done = threading.Event()
    results: dict[int, list[str]] = {i: [] for i in range(4)}
    finished = []

    def emitter(i):
        def emit(ev):
            if isinstance(ev, Delta):
                results[i].append(ev.text)
                seen_active.append(b.load()["active"])
            else:
                finished.append(ev)
                if len(finished) == 5:
                    done.set()
        return emit

    # a long request occupies the worker while the four others queue up, so they start as one batch of four
    b.start(Prompt(text="long"), SamplingParams(max_tokens=60, temperature=0.0), lambda ev: (
        finished.append(ev), len(finished) == 5 and done.set()) if not isinstance(ev, Delta) else None)
    for i, p in enumerate(prompts):
        b.start(p, GREEDY, emitter(i))
    assert done.wait(120)
    assert max(seen_active) == 4
    assert ["".join(results[i]) for i in range(4)] == [t for t, _ in alone]
    b.close()


# ---------------------------------------------------------------- --device
def test_device_serves_the_file_the_build_chose_sized_by_the_profile(build):
    chosen = json.loads((build / PI / "device.json").read_text())["choice"]["path"]
    plan = plan_serving(build, device=PI)
    assert plan.path == (build / PI / Path(chosen).name).resolve()
    assert plan.backend == {"gguf": "llamacpp", "onnx": "onnx"}[chosen.rsplit(".", 1)[1]]
    assert (plan.threads, plan.ctx, plan.device) == (4, 2048, PI)
    assert plan.slots == (1 if plan.backend == "onnx" else 8)
    # the build's recorded choice wins over a fresh fit: make the manifest name the GGUF and serve that
    manifest = json.loads((build / MANIFEST).read_text())
    rep = manifest["stages"]["devices"]["metrics"][PI]
    gguf_fit = next(f for f in rep["fits"] if f["path"].endswith(".gguf"))
    manifest["stages"]["devices"]["metrics"][PI] = {**rep, "choice": gguf_fit}
    edited = build.parent / "edited"
    shutil.copytree(build, edited, dirs_exist_ok=True)
    atomic_write_json(edited / MANIFEST, manifest)
    plan = plan_serving(edited, device=PI)
    assert plan.backend == "llamacpp" and plan.path.name == "student-f16.gguf"
    # a --backend other than the chosen runtime takes that runtime's best-fitting file
    assert plan_serving(edited, device=PI, backend="onnx").path.name == "student.onnx"
    assert plan_serving(build, device=PI, backend="transformers").path == (build / "student").resolve()


def test_device_the_build_did_not_target_is_fitted_now_and_bounds_slots(build):
    plan = plan_serving(build, device="laptop-x86-16gb", backend="llamacpp", ctx=512)
    assert plan.path.name == "student-f16.gguf" and plan.ctx == 512 and plan.threads == 8
    assert plan.memory["max_slots"] > 8 and plan.slots == 8
    with pytest.raises(ServeError, match=r"--slots 100000 does not fit .*at most \d+ slot"):
        plan_serving(build, device="laptop-x86-16gb", backend="llamacpp", slots=100_000)


def test_device_serves_over_http(build):
    with serving(create_app(build, device=PI, max_tokens_cap=16)) as url:
        resp = client_for(url).chat.completions.create(model=NAME, messages=USER, max_tokens=4, temperature=0)
        assert resp.usage.completion_tokens <= 4


def test_unknown_device_and_backend_are_clear_errors(build):
    with pytest.raises(ServeError, match=r"unknown device 'toaster'; known devices: .*raspberry-pi-5-8gb"):
        plan_serving(build, device="toaster")
    with pytest.raises(ServeError, match=r"unknown backend 'vllm'; choose one of llamacpp, onnx, transformers"):
        plan_serving(build, backend="vllm")
    from edgedistill.cli import app
    r = CliRunner().invoke(app, ["serve", str(build), "--device", "toaster", "--no-ui"])
    assert r.exit_code == 2 and "known devices" in r.output and "host" in r.output


def test_onnx_backend_needs_an_onnx_export(tmp_path, build):
    only_gguf = tmp_path / "b"
    (only_gguf / "export").mkdir(parents=True)
    shutil.copy(build / "export" / "student-f16.gguf", only_gguf / "export")
    atomic_write_json(only_gguf / MANIFEST, {"stages": {"export": {"status": "done", "outputs": [
        file_record(only_gguf, only_gguf / "export" / "student-f16.gguf")]}}})
    with pytest.raises(ServeError, match="no ONNX export"):
        plan_serving(only_gguf, backend="onnx")
    with pytest.raises(ServeError, match="no Hugging Face model"):
        plan_serving(only_gguf, backend="transformers")


# ---------------------------------------------------------------- --workers
def test_workers_are_instances_and_requests_go_to_the_least_busy(build):
    plan = plan_serving(build, backend="llamacpp", workers=2, slots=2, ctx=256, threads=2)
    assert (plan.workers, plan.threads) == (2, 1)
    pool = open_backend(plan)
    try:
        long = SamplingParams(max_tokens=64, temperature=0.0)
        handles = [pool.start(Prompt(text="def f(x):"), long, lambda ev: None) for _ in range(2)]
        loads = [w.load() for w in pool.workers]
        assert [x["queue_depth"] + x["active"] for x in loads] == [1, 1]
        assert pool.load()["slots"] == 4
        for h in handles:
            h.cancel()
        t0 = time.monotonic()
        while pool.load()["active"] and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert generate(pool, Prompt(messages=tuple(USER)), GREEDY)[1].completion_tokens <= 8
    finally:
        pool.close()
    with serving(create_app(build, workers=2, slots=2, ctx_per_slot=256, n_threads=2, max_tokens_cap=8)) as url:
        assert client_for(url).chat.completions.create(model=NAME, messages=USER, max_tokens=4).usage


def test_transformers_backend_writes_the_prefix_and_reports_logprobs(build):
    from edgedistill.serve.torch_backend import TransformersBackend

    b = TransformersBackend(build / "student", slots=2, n_ctx=256, n_threads=1)
    try:
        plain = b.render(Prompt(messages=tuple(USER)))
        prefixed = b.render(Prompt(messages=tuple(USER), prefix="<think>\n"))
        assert prefixed[:len(plain)] == plain and len(prefixed) > len(plain)
        _, fin = generate(b, Prompt(messages=tuple(USER)), SamplingParams(max_tokens=5, temperature=0.0, logprobs=True))
        assert len(fin.token_logprobs) >= fin.completion_tokens and all(lp <= 0 for lp in fin.token_logprobs)
    finally:
        b.close()


# ---------------------------------------------------------------- thinking: one contract on every backend
Q = ({"role": "user", "content": "What is 17 + 25?"},)
THINKING = SamplingParams(max_tokens=40, temperature=0.0, logprobs=True, think_open=True, think_budget=5)


def stop_thinking_tokens(build) -> int:
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(str(build / "student"))(STOP_THINKING, add_special_tokens=False)
               ["input_ids"])


def test_every_backend_closes_the_think_block_at_its_budget(build):
    """The budget is spent after exactly `think_budget` thinking tokens; each backend then writes the stop-thinking
    sentence and `</think>` into the sequence itself and the model answers from there. Inserted tokens count as
    completion tokens but get no log-prob. onnxruntime and torch decode the same weights: the same text."""
    inserted = stop_thinking_tokens(build)
    prompt = Prompt(messages=Q, prefix=PREFILL["on"])
    seen = {}
    for kind in ("llamacpp", "onnx", "transformers"):
        b = open_backend(plan_serving(build, backend=kind, slots=2, ctx=256, threads=1))
        try:
            text, fin = generate(b, prompt, THINKING)
            seen[kind] = text, fin
            assert fin.budget_hit and fin.thinking_tokens == THINKING.think_budget, (kind, fin)
            thought, sep, answer = text.partition(STOP_THINKING)
            assert sep and "</think>" not in thought and answer, (kind, text)
            assert all(lp <= 0 for lp in fin.token_logprobs)
            if kind == "llamacpp":
                continue
            assert fin.completion_tokens == len(fin.token_logprobs) + inserted, (kind, fin)
            # The inserted tokens are really in the sequence: the same text given as the prompt continues alike.
            again, _ = generate(b, Prompt(messages=Q, prefix=PREFILL["on"] + thought + STOP_THINKING),
                                SamplingParams(max_tokens=4, temperature=0.0))
            assert answer.startswith(again), (kind, answer, again)
            # Without a budget nothing is inserted and every token is a thinking token (the block never closes).
            free, fin2 = generate(b, prompt, SamplingParams(max_tokens=12, temperature=0.0, think_open=True))
            assert STOP_THINKING not in free and not fin2.budget_hit
            assert fin2.thinking_tokens == fin2.completion_tokens and not fin2.token_logprobs
            # Not inside a block: no thinking tokens.
            _, fin3 = generate(b, Prompt(messages=Q), SamplingParams(max_tokens=8, temperature=0.0, think_budget=2))
            assert (fin3.thinking_tokens, fin3.budget_hit) == (0, False)
        finally:
            b.close()
    (t1, f1), (t2, f2) = seen["onnx"], seen["transformers"]
    assert t1 == t2 and f1.completion_tokens == f2.completion_tokens
    assert f1.token_logprobs == pytest.approx(f2.token_logprobs, abs=1e-3)


def test_transformers_budget_row_leaves_the_rest_of_its_batch_alone(build):
    """The stop-thinking tokens go into one row of the batch (one per step, instead of sampling); a request batched
    with it gets the very text it gets alone."""
    from edgedistill.serve.torch_backend import TransformersBackend

    b = TransformersBackend(build / "student", slots=2, n_ctx=256, n_threads=1)
    try:
        plain_params = SamplingParams(max_tokens=30, temperature=0.0)
        alone = generate(b, Prompt(messages=tuple(USER)), plain_params)[0]
        thinking_alone = generate(b, Prompt(messages=Q, prefix=PREFILL["on"]), THINKING)
        done, parts, fins = threading.Event(), {0: [], 1: []}, {}

        def emitter(i):
            def emit(ev):
                if isinstance(ev, Delta):
                    parts[i].append(ev.text)
                else:
                    fins[i] = ev
                    if len(fins) == 2:
                        done.set()
            return emit
        # a long request occupies the worker so that the next two start as one batch of two
        blocker = threading.Event()
        b.start(Prompt(text="long"), SamplingParams(max_tokens=40, temperature=0.0),
                lambda ev: None if isinstance(ev, Delta) else blocker.set())
        b.start(Prompt(messages=Q, prefix=PREFILL["on"]), THINKING, emitter(0))
        b.start(Prompt(messages=tuple(USER)), plain_params, emitter(1))
        assert done.wait(120) and blocker.is_set()
        text, fin = thinking_alone
        assert "".join(parts[0]) == text and fins[0].budget_hit and fins[0].thinking_tokens == fin.thinking_tokens
        assert fins[0].completion_tokens == fin.completion_tokens
        assert fins[0].token_logprobs == pytest.approx(fin.token_logprobs, abs=1e-3)  # padded batch: float noise
        assert "".join(parts[1]) == alone and not fins[1].budget_hit
    finally:
        b.close()


@pytest.mark.parametrize("kind", ["onnx", "transformers"])
def test_thinking_budget_and_strict_off_through_the_server(build, kind):
    from edgedistill.routing.policy import RoutingPolicy

    app = create_app(build, backend_kind=kind, slots=2, ctx_per_slot=256, n_threads=1, max_tokens_cap=64,
                     policy=RoutingPolicy(calibrated=True))
    with serving(app) as url:
        oa = client_for(url)
        kw = dict(model=NAME, messages=list(Q), max_tokens=40, temperature=0,
                  extra_body={"thinking": {"type": "enabled", "budget_tokens": 5}})
        r = oa.chat.completions.create(**kw)
        ed, msg = r.model_extra["edgedistill"], r.choices[0].message
        assert (ed["think_mode"], ed["think_budget"], ed["budget_hit"], ed["thinking_tokens"]) == ("on", 5, True, 5)
        assert msg.model_extra["reasoning"].endswith(STOP_THINKING.split("</think>")[0])
        assert msg.content and "<think>" not in msg.content and "</think>" not in msg.content
        assert r.usage.completion_tokens > 5 + stop_thinking_tokens(build) - 1
        chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == msg.content
        assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == msg.model_extra["reasoning"]
        last = chunks[-1].model_extra["edgedistill"]
        assert last["budget_hit"] and last["thinking_tokens"] == 5
        # An explicit off: no think block is opened, nothing is counted, no think text reaches content.
        off = oa.chat.completions.create(model=NAME, messages=list(Q), max_tokens=12, temperature=0,
                                         extra_body={"reasoning_effort": "none"})
        ed = off.model_extra["edgedistill"]
        assert (ed["think_mode"], ed["thinking_tokens"], ed["budget_hit"]) == ("off", 0, False)
        assert off.choices[0].message.model_extra.get("reasoning") is None
        assert "<think>" not in off.choices[0].message.content and "</think>" not in off.choices[0].message.content


@pytest.mark.parametrize("kind", ["onnx", "transformers"])
def test_routed_requests_get_a_confidence_from_every_backend(build, kind):
    """With --llm, the small model's token log-probs become the routing confidence; escalation follows it."""
    from edgedistill.routing.policy import RoutingPolicy

    llm = build / "export" / "student-f16.gguf"
    for threshold, escalated in ((0.0, False), (1.01, True)):
        app = create_app(build, backend_kind=kind, llm=str(llm), slots=2, ctx_per_slot=256, n_threads=1,
                         max_tokens_cap=32, policy=RoutingPolicy(calibrated=True, escalation_threshold=threshold))
        with serving(app) as url:
            r = client_for(url).chat.completions.create(model=NAME, messages=list(Q), max_tokens=8, temperature=0)
        ed = r.model_extra["edgedistill"]
        # (a random tiny model is unsure of everything: its confidence rounds to 0, but it is measured)
        assert ed["confidence"] is not None and 0.0 <= ed["confidence"] <= 1.0, ed
        assert ed["reason"].startswith(f"confidence {ed['confidence']:.2f} " + ("<" if escalated else ">=")), ed
        assert ed["escalated"] is escalated and ed["models"][0] == NAME and len(ed["models"]) == 1 + escalated, ed

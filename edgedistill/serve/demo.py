"""A Gradio chat page that talks to the server's own OpenAI API (mounted at /ui).

The page is a client like any other: it streams from /v1/chat/completions with the official
`openai` package, shows reasoning as a collapsible thought bubble (ChatMessage metadata), and
puts a route card under each answer (model used, think mode, confidence, escalated or not, tokens,
latency: the response's `edgedistill` object), repeated in the `route-card` panel below the chat.
Controls: temperature, max tokens, and thinking (off / auto / on, and a budget; sent as the request's
`thinking` field). The API key, if any, stays on the server side.
"""
# No `from __future__ import annotations`: Gradio spots the `gr.Request` parameter by its evaluated annotation.
import time
from typing import Any, Iterator

UI_PATH = "/ui"


def _api_base(request: Any) -> str:
    """The server this page is mounted on, as the browser reached it (loopback by default)."""
    host = request.headers.get("host", "127.0.0.1:8000")
    return f"http://{host}/v1"


def _text(content: Any) -> str:
    """Gradio 6 hands message content back as a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


THINK_TYPES = {"off": "disabled", "auto": "auto", "on": "enabled"}


def thinking_field(mode: str, budget: int) -> dict:
    """The request's `thinking` switch for the page's controls (budget 0: no limit)."""
    out: dict[str, Any] = {"type": THINK_TYPES[mode]}
    if budget and mode != "off":
        out["budget_tokens"] = int(budget)
    return out


def route_card(route: dict | None, model: str, usage: Any, elapsed: float, thought: bool) -> str:
    """One line of Markdown from the response's `edgedistill` object (what the server says it did)."""
    tokens = f"{usage.prompt_tokens} in / {usage.completion_tokens} out" if usage else "tokens unknown"
    if not route:
        return (f"**model** `{model}` · **think** {'yes' if thought else 'no'} · **escalated** no · "
                f"**tokens** {tokens} · **latency** {elapsed:.2f} s")
    think = route["think_mode"] + f" ({route['think_requested']})"
    if route["think_mode"] == "on":
        think += f", budget {route['think_budget'] or 'none'}, {route['thinking_tokens']} thinking tokens"
        think += ", budget hit" if route["budget_hit"] else ""
    conf = "n/a" if route["confidence"] is None else f"{route['confidence']:.2f}"
    if route["threshold"] is not None:
        conf += f" (threshold {route['threshold']:.2f})"
    lat = route["latency_ms"]
    parts = [f"policy {lat['policy']:.2f} ms"] + [f"{k} {lat[k]:.0f} ms" for k in ("small", "large") if lat[k]]
    return (f"**model** `{route['answered_by'] or model}` · **think** {think} · **confidence** {conf} · "
            f"**escalated** {'yes' if route['escalated'] else 'no'} — {route['reason']} · **tokens** {tokens} · "
            f"**latency** {elapsed:.2f} s ({', '.join(parts)})")


def build_demo(*, api_key: str | None, model: str) -> Any:
    import gradio as gr
    import openai

    def respond(message: str, history: list[dict], temperature: float, max_tokens: int, think_mode: str,
                think_budget: int, request: gr.Request) -> Iterator[tuple[list[dict], str, str]]:
        history = list(history or [])
        if not message.strip():
            yield history, "", ""
            return
        # Earlier turns go back to the model without thought bubbles and route cards.
        prior = [{"role": m["role"], "content": _text(m.get("content"))} for m in history
                 if not (m.get("metadata") or {}).get("title")]
        history.append({"role": "user", "content": message})
        client = openai.OpenAI(base_url=_api_base(request), api_key=api_key or "none", max_retries=0, timeout=600)
        started = time.perf_counter()
        thought = {"role": "assistant", "content": "", "metadata": {"title": "Thinking", "status": "pending"}}
        answer = {"role": "assistant", "content": ""}
        usage = route = None
        try:
            stream = client.chat.completions.create(
                model=model, messages=prior + [{"role": "user", "content": message}], stream=True,
                temperature=temperature, max_tokens=int(max_tokens), stream_options={"include_usage": True},
                extra_body={"thinking": thinking_field(think_mode, think_budget)})
            for chunk in stream:
                usage = chunk.usage or usage
                route = (chunk.model_extra or {}).get("edgedistill") or route
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                reasoning = (delta.model_extra or {}).get("reasoning")
                if reasoning:
                    if thought not in history:
                        history.append(thought)
                    thought["content"] += reasoning
                if delta.content:
                    if answer not in history:
                        history.append(answer)
                    answer["content"] += delta.content
                yield history, "", ""
        except openai.APIError as e:
            history.append({"role": "assistant", "content": f"Error: {e.message}"})
            yield history, "", f"Error: {e.message}"
            return
        thought["metadata"]["status"] = "done"
        if answer not in history:
            history.append(answer)
        card = route_card(route, model, usage, time.perf_counter() - started, thought in history)
        history.append({"role": "assistant", "content": card, "metadata": {"title": "Route", "status": "done"}})
        yield history, "", card

    with gr.Blocks(title=f"edgedistill · {model}") as demo:
        gr.Markdown(f"### {model}\nStreaming from this server's OpenAI-compatible API.")
        chat = gr.Chatbot(label="chat", height=480)
        box = gr.Textbox(placeholder="Ask something…", show_label=False)
        card = gr.Markdown("", elem_id="route-card", label="route")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
            max_tokens = gr.Slider(1, 1024, value=256, step=1, label="max tokens")
        with gr.Row():
            think_mode = gr.Radio(["off", "auto", "on"], value="auto", label="thinking",
                                  info="auto: the routing policy decides per question")
            think_budget = gr.Slider(0, 1024, value=0, step=16, label="thinking budget (tokens, 0 = no limit)")
        gr.Button("Clear").click(lambda: ([], "", ""), outputs=[chat, box, card])
        box.submit(respond, [box, chat, temperature, max_tokens, think_mode, think_budget], [chat, box, card],
                   api_name="chat")
    return demo


def mount_demo(app: Any, *, api_key: str | None, model: str) -> None:
    import gradio as gr

    gr.mount_gradio_app(app, build_demo(api_key=api_key, model=model), path=UI_PATH)

"""A Gradio chat page that talks to the server's own OpenAI API (mounted at /ui).

The page is a client like any other: it streams from /v1/chat/completions with the official
`openai` package, shows reasoning as a collapsible thought bubble (ChatMessage metadata), and
puts a route card (model, tokens, latency) under each answer. The API key, if any, stays on the
server side.
"""
# No `from __future__ import annotations`: Gradio spots the `gr.Request` parameter by its evaluated annotation.
import secrets
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


def build_demo(*, api_key: str | None, model: str) -> Any:
    import gradio as gr
    import openai

    def respond(message: str, history: list[dict], temperature: float, max_tokens: int,
                request: gr.Request) -> Iterator[tuple[list[dict], str]]:
        history = list(history or [])
        if not message.strip():
            yield history, ""
            return
        # Earlier turns go back to the model without thought bubbles and route cards.
        prior = [{"role": m["role"], "content": _text(m.get("content"))} for m in history
                 if not (m.get("metadata") or {}).get("title")]
        history.append({"role": "user", "content": message})
        client = openai.OpenAI(base_url=_api_base(request), api_key=api_key or "none", max_retries=0, timeout=600)
        started = time.perf_counter()
        thought = {"role": "assistant", "content": "", "metadata": {"title": "Thinking", "status": "pending"}}
        answer = {"role": "assistant", "content": ""}
        usage = None
        try:
            stream = client.chat.completions.create(
                model=model, messages=prior + [{"role": "user", "content": message}], stream=True,
                temperature=temperature, max_tokens=int(max_tokens), stream_options={"include_usage": True})
            for chunk in stream:
                usage = chunk.usage or usage
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
                yield history, ""
        except openai.APIError as e:
            history.append({"role": "assistant", "content": f"Error: {e.message}"})
            yield history, ""
            return
        thought["metadata"]["status"] = "done"
        if answer not in history:
            history.append(answer)
        elapsed = time.perf_counter() - started
        tokens = f"{usage.prompt_tokens} in / {usage.completion_tokens} out" if usage else "tokens unknown"
        card = (f"**model** `{model}` · **think** {'yes' if thought in history else 'no'} · "
                f"**escalated** no · **tokens** {tokens} · **latency** {elapsed:.2f} s")
        history.append({"role": "assistant", "content": card, "metadata": {"title": "Route", "status": "done"}})
        yield history, ""

    with gr.Blocks(title=f"edgedistill · {model}") as demo:
        gr.Markdown(f"### {model}\nStreaming from this server's OpenAI-compatible API.")
        chat = gr.Chatbot(label="chat", height=480)
        box = gr.Textbox(placeholder="Ask something…", show_label=False)
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
            max_tokens = gr.Slider(1, 1024, value=256, step=1, label="max tokens")
        gr.Button("Clear").click(lambda: ([], ""), outputs=[chat, box])
        box.submit(respond, [box, chat, temperature, max_tokens], [chat, box], api_name="chat")
    return demo


def mount_demo(app: Any, *, api_key: str | None, model: str) -> None:
    import gradio as gr

    # With an API key the page asks for it too (any user name): otherwise it would be a way around the key.
    auth = (lambda _user, password: secrets.compare_digest(password.encode(), api_key.encode())) if api_key else None
    gr.mount_gradio_app(app, build_demo(api_key=api_key, model=model), path=UI_PATH, auth=auth)

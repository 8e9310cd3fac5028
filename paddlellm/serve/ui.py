"""The Gradio chat UI of `paddlellm serve` (--port): chat with history, sampling sliders, clear and regenerate.

Replies stream in as they are generated. The UI submits to the same queue as the HTTP API (in process,
no extra HTTP hop), so its requests are batched with the API's and share its limits.
"""
from __future__ import annotations

import hmac
import os
from typing import Callable, Dict, Iterator, List

from ..arguments import UserError

# Page fonts from the system, not Google Fonts: the UI must work on machines without internet access.
SANS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO = ("ui-monospace", "monospace")


def history_turns(history: List[Dict]) -> tuple:
    """(user turns, bot replies) of a Gradio "messages" history that ends with a reply."""
    users, bots = [], []
    for m in history:
        text = m.get("content") if isinstance(m.get("content"), str) else ""
        if m.get("role") == "user":
            if len(users) > len(bots):  # two user messages in a row: join them
                users[-1] += "\n" + text
            else:
                users.append(text)
        elif m.get("role") == "assistant" and len(bots) < len(users):
            bots.append(text)
    if len(bots) < len(users):  # an unanswered message (e.g. a failed turn) is dropped
        users = users[: len(bots)]
    return users, bots


def build_ui(stream_reply: Callable, defaults: Dict, max_length: int, title: str):
    """A gr.Blocks chat page. stream_reply(user_turns, bot_turns, params) yields the reply so far (cumulative
    text) and raises ApiError when the request is refused."""
    import gradio as gr

    from .requests import ApiError

    def respond(history: List[Dict], top_k, top_p, temperature, repetition_penalty, max_new) -> Iterator[List[Dict]]:
        users, bots = history_turns(history[:-1])
        users.append(history[-1]["content"])
        params = dict(top_k=int(top_k), top_p=float(top_p), temperature=float(temperature),
                      repetition_penalty=float(repetition_penalty), max_length=int(max_new))
        history = history + [{"role": "assistant", "content": ""}]
        try:
            for text in stream_reply(users, bots, params):
                history[-1] = {"role": "assistant", "content": text}
                yield history
        except ApiError as e:
            gr.Warning(e.message)
            yield history[:-1]

    def add_user(message: str, history: List[Dict]):
        if not message or not message.strip():
            return gr.update(), history
        return "", history + [{"role": "user", "content": message}]

    def drop_last_reply(history: List[Dict]):
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        return history

    def answer_again(history: List[Dict], *sliders):
        if history and history[-1]["role"] == "user":
            yield from respond(history, *sliders)
        else:
            yield history

    with gr.Blocks(title=title, theme=gr.themes.Default(font=SANS, font_mono=MONO), analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        chatbot = gr.Chatbot(type="messages", label="Chat", height=460, elem_id="chatbot")
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            top_k = gr.Slider(0, 100, value=defaults["top_k"], step=1, label="top_k (1 = greedy, 0 = off)")
            top_p = gr.Slider(0.01, 1.0, value=defaults["top_p"], step=0.01, label="top_p")
            temperature = gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="temperature (0 = greedy)")
            repetition_penalty = gr.Slider(0.5, 2.0, value=defaults["repetition_penalty"], step=0.05, label="repetition penalty")
            max_new = gr.Slider(1, max_length, value=max_length, step=1, label="max length (new tokens)")
        sliders = [top_k, top_p, temperature, repetition_penalty, max_new]
        for trigger in (box.submit, send.click):
            trigger(add_user, [box, chatbot], [box, chatbot], queue=False).then(respond, [chatbot] + sliders, chatbot)
        regenerate.click(drop_last_reply, chatbot, chatbot, queue=False).then(answer_again, [chatbot] + sliders, chatbot)
        clear.click(lambda: [], None, chatbot, queue=False)
    return demo


def launch_ui(state, args) -> Callable[[], None]:
    """Start the UI on args.host:args.port in background threads; returns a function that stops it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a server
    from .requests import ChatRequest, parse_sampling

    def stream_reply(users, bots, params):
        max_new, sampling = parse_sampling(params, state.defaults, state.args.max_length, ("max_length",))
        req = state.submit(ChatRequest(users, bots, max_new, sampling, stream=True))
        try:
            for kind, value in req.events_until_done(lambda: False, state.scheduler.cancel):
                if kind == "piece":
                    yield req.text.sent
                elif kind == "error":
                    from .requests import ApiError

                    raise ApiError(*value)
        finally:
            state.scheduler.cancel(req)  # the page was closed or the event cancelled: free the slot

    defaults = dict(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, repetition_penalty=args.repetition_penalty)
    demo = build_ui(stream_reply, defaults, state.args.max_length, args.title)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=args.max_batch_size)
    auth = (lambda user, password: hmac.compare_digest(str(password).encode(), args.api_key.encode())) if args.api_key else None
    try:
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, share=False, inbrowser=False,
                    quiet=True, show_error=True, auth=auth, auth_message="Enter any user name and the server's API key as the password.")
    except OSError as e:
        raise UserError(f"cannot start the chat UI on {args.host}:{args.port} (--port): {e}") from None
    return demo.close

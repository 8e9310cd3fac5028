"""Serving: the HTTP API (app), request parsing (requests), OpenAI response shapes (responses), the queue and
text streaming (scheduler), batched generation (engine), the Gradio UI (ui).

`paddlellm serve` / flask_server.py run `main`; see paddlellm.serve.app for how it works.
"""
from .app import main  # noqa: F401

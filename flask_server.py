"""HTTP API (PaddleNLP-style and OpenAI-compatible) and Gradio chat UI: python flask_server.py [ARGS.json] [--key value ...] (--help lists the arguments)."""
import sys

from paddlellm.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("serve", sys.argv[1:]))

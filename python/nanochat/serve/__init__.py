"""The OpenAI-compatible server and web UI over a chat model: the Starlette app in serve/app.py, the `nanochat serve`
command in serve/cli.py (also `python -m nanochat.serve`)."""

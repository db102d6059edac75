"""The front ends of a chat model: the OpenAI-compatible server with its web UI (app, history, cli; also
`python -m nanochat.serve`) and the terminal chat (chat_cli)."""

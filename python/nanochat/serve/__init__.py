"""The front ends of a chat model: the OpenAI-compatible server with its web UI (`nanochat serve`, also
`python -m nanochat.serve`) and the terminal chat (chat_cli).

The server's modules import one way: app (routes, create_app) and cli over metrics, replicas and protocol (the wire
format), over config and history; none of them imports app."""

"""The wire format of the OpenAI chat-completions API as this server speaks it: reading and validating a request
body, and the JSON objects of the answers (chat.completion, chat.completion.chunk as server-sent events, errors,
the models list).

The contract: a body the server cannot serve raises `BadRequest`, which the app answers as a 4xx with an OpenAI
error object naming the bad field and the accepted range; nothing here raises anything else on client input, so a
malformed request is never a 5xx. Limits come from ServerConfig and the model (context, vocabulary, decode rows).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

from nanochat.inference.sampling import SamplingParams
from nanochat.serve.config import ServerConfig

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}  # scheduler -> OpenAI reason
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream


# ---------------------------------------------------------------------------------------------------------------
# Errors


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "server_busy"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def stream_error(message: str, code: str) -> str:
    """An OpenAI-style error object as a server-sent event: how a stream whose status line is sent says it failed
    (the openai client raises APIError with this message)."""
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return f"data: {json.dumps({'error': error})}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating a request


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise BadRequest(f"request body of {declared} bytes exceeds the limit of {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None


def _check_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} is not valid Unicode (lone surrogate)", where) from None
    return text


def parse_messages(messages, config: ServerConfig) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    if len(messages) > config.max_messages:
        raise BadRequest(f"too many messages: {len(messages)}, limit {config.max_messages}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {list(ROLES)}, got {role!r:.40}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}}",
                                     f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string or an array of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": _check_text(content, where)})
    if out[-1]["role"] != "user":
        raise BadRequest("the last message must have role 'user'", "messages")
    return out


def _number(payload: dict, name: str, lo: float, hi: float, default):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {value!r:.40}", name)
    return float(value)


def _integer(payload: dict, name: str, lo: int, hi: int | None, default):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise BadRequest(f"'{name}' must be an integer in {bound}, got {value!r:.40}", name)
    return value


@dataclass
class ParsedRequest:
    messages: list[dict]
    params: SamplingParams
    max_tokens_set: bool
    n: int
    stream: bool
    include_usage: bool


def parse_request(payload, config: ServerConfig, context: int, vocab_size: int,
                  batch_rows: int | None = None) -> ParsedRequest:
    """Validate a chat completion body against the server's limits: `context` tokens and `batch_rows` decode rows
    per replica (a request's n samples decode side by side, so n cannot exceed them)."""
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = parse_messages(payload.get("messages"), config)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    max_tokens = _integer(payload, "max_tokens", 1, context, None)
    max_tokens = _integer(payload, "max_completion_tokens", 1, context, max_tokens)
    temperature = _number(payload, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(payload, "top_p", 0.0, 1.0, None)
    top_k = _integer(payload, "top_k", 0, vocab_size, None)
    n = _integer(payload, "n", 1, min(config.max_n, batch_rows or config.max_n), 1)
    seed = _integer(payload, "seed", -(2 ** 63), 2 ** 63 - 1, None)
    stop = payload.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > config.max_stop or not all(
            isinstance(s, str) and 0 < len(s) <= config.max_stop_chars for s in stop):
        raise BadRequest(f"'stop' must be a string or an array of at most {config.max_stop} non-empty strings "
                         f"of at most {config.max_stop_chars} characters", "stop")
    for s in stop:
        _check_text(s, "stop")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    params = SamplingParams(max_tokens=max_tokens or config.default_max_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=None if seed is None else seed % (2 ** 63), stop=tuple(stop))
    return ParsedRequest(messages, params, max_tokens is not None, n, stream, bool(options.get("include_usage")))


# ---------------------------------------------------------------------------------------------------------------
# The answer objects


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_event(completion_id: str, model: str, choices: list[dict], usage: dict | None = None,
                include_usage: bool = False) -> str:
    """A chat.completion.chunk as a server-sent event; with stream_options.include_usage every chunk carries a
    "usage" key, null except on the last one."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices}
    if include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def role_choice(index: int) -> dict:
    """A stream's first chunk for a sample: the role, no text yet."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def text_choice(index: int, text: str) -> dict:
    return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}


def final_choice(index: int, reason: str) -> dict:
    """A sample's last chunk: no text, the scheduler's finish reason in OpenAI's words."""
    return {"index": index, "delta": {}, "logprobs": None, "finish_reason": FINISH[reason]}


def completion_body(completion_id: str, model: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    """A chat.completion: one choice per sample, its whole text and its finish reason (the scheduler's, mapped)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
                "finish_reason": FINISH[reason]} for i, (text, reason) in enumerate(zip(texts, reasons))]
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage}


def models_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "nanochat"}]}

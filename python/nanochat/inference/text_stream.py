"""Token ids -> text deltas for the CLI, the server and the web UI: `TextStream` holds back incomplete UTF-8 and any
tail that may start a stop string, and renders the tool tokens as Markdown code fences (SPECIAL_TEXT)."""

from __future__ import annotations

# How tool tokens read in text output (the CLI, the server, the web UI): Markdown code fences.
SPECIAL_TEXT = {
    "<|python_start|>": "\n```python\n", "<|python_end|>": "\n```\n",
    "<|output_start|>": "```output\n", "<|output_end|>": "\n```\n",
}


class TextStream:
    """Token ids -> text deltas: holds back incomplete UTF-8 and any tail that could begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), special_text: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.special_text = special_text or {}
        self.pending_ids: list[int] = []
        self.held = ""  # decoded text not yet released
        self.stopped = False

    def _decode_pending(self, force: bool) -> str:
        if not self.pending_ids:
            return ""
        text = self.tokenizer.decode(self.pending_ids)
        if text.endswith("\ufffd") and not force and len(self.pending_ids) < 4:
            return ""  # an incomplete multi-byte character: wait for the next token
        self.pending_ids = []
        return text

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text to show now, whether a stop string was hit). After a stop, returns ("", True)."""
        if self.stopped:
            return "", True
        if token in self.special_text:
            new = self._decode_pending(force=True) + self.special_text[token]
        else:
            self.pending_ids.append(token)
            new = self._decode_pending(force=False)
        return self._release(self.held + new)

    def _release(self, text: str) -> tuple[str, bool]:
        if not self.stop:
            self.held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return text[:min(hits)], True
        keep = 0  # longest suffix of text that is a proper prefix of some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """At the end of generation: everything still held (a partial stop string is plain text after all)."""
        if self.stopped:
            return ""
        text = self.held + self._decode_pending(force=True)
        self.held = ""
        return text


"""The one front door to generation, so that the chat CLI, the evals and RL, and the server run the same scheduler
and a request gets the same tokens whichever of them sends it.

Contracts:
- `stream` (one prompt, events as they come) and `generate` (many prompts to completion) drive a `Scheduler` in the
  caller's thread; `serving_scheduler` builds one for a server's worker thread. All use this engine's settings
  (the python tool, the prefix store, CUDA graphs, tokens per step).
- A synchronous call owns its scheduler until it returns. However it ends (done, a failed batch step, the caller
  stopping early) its requests are released and their rows freed; the scheduler is kept while the next call fits
  it, so its CUDA graphs stay captured.
- A model failure reaches the caller as an error event naming the cause (`stream`), or a RuntimeError naming the
  prompt and the cause (`generate`), as it reaches a server's client.
- The KV of finished replies stays in the engine's prefix store across calls and is shared with the serving
  scheduler, so a chat that resends its history prefills only the new turn.
"""

from __future__ import annotations

from typing import Iterator

from nanochat.inference.kv_cache import PrefixStore, round_up
from nanochat.inference.sampling import SamplingParams
from nanochat.inference.scheduler import TERMINAL_TOKENS, GenerationRequest, Scheduler, TokenEvent


class Engine:
    """Generation over one model for one caller at a time (`stream`, `generate`), or the scheduler a server's worker
    thread runs (`serving_scheduler`). `prefix_cache_tokens`: KV kept for reuse (default one context; 0 = off)."""

    def __init__(self, model, tokenizer, tools: bool = True, prefix_cache_tokens: int | None = None,
                 cuda_graphs: bool | None = None, step_tokens: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.tools = tools
        tokens = model.config.sequence_len if prefix_cache_tokens is None else prefix_cache_tokens
        self.prefix_store = PrefixStore(tokens) if tokens > 0 else None
        self.cuda_graphs = cuda_graphs
        self.step_tokens = step_tokens
        self.terminal = {tokenizer.encode_special(name) for name in TERMINAL_TOKENS}
        self._scheduler: Scheduler | None = None

    def serving_scheduler(self, batch_size: int, max_waiting: int | None = None) -> Scheduler:
        """A scheduler over the whole context for `Scheduler.serve_forever` in a worker thread, fed by `submit`
        from other threads; `max_waiting` bounds its queue (submit returns False when full)."""
        return Scheduler(self.model, self.tokenizer, batch_size=batch_size, tools=self.tools,
                         max_waiting=max_waiting, step_tokens=self.step_tokens, prefix_cache=self.prefix_store,
                         cuda_graphs=self.cuda_graphs)

    def stream(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = 42,
               stop: tuple[str, ...] = ()) -> Iterator[TokenEvent]:
        """Yield the TokenEvents of `num_samples` samples of one prompt as they are produced (samples interleaved
        step by step). The prompt must fit the context; max_tokens is clipped to the room left."""
        context = self.model.config.sequence_len
        if len(tokens) >= context:
            raise ValueError(f"prompt of {len(tokens)} tokens does not fit the model's context of {context}")
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop=tuple(stop))
        params.max_tokens = min(max_tokens, context - len(tokens))
        req = GenerationRequest(list(tokens), params, n=num_samples)
        for _, event in self._run([req], num_samples):
            yield event

    def generate(self, prompts: list[list[int]], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 42,
                 seeds: list[int] | None = None, stop: tuple[str, ...] = (),
                 batch_size: int = 16) -> list[list[tuple[list[int], list[int]]]]:
        """For each prompt, `num_samples` (generated ids, mask) pairs; mask 1 = sampled, 0 = forced by the tool.

        All prompts share one scheduler of `batch_size` rows (at least num_samples); terminal tokens
        (<|assistant_end|>, <|bos|>) are left out. Prompt i uses seed `seeds[i]` (default seed + i); a prompt
        longer than the context keeps its last tokens. Raises RuntimeError when the model fails on a prompt.
        The model runs in eval mode and gets its training mode back."""
        if not prompts:
            return []
        context = self.model.config.sequence_len
        requests = []
        for i, prompt in enumerate(prompts):
            prompt = prompt[-(context - 1):]
            params = SamplingParams(max_tokens=max(1, min(max_tokens, context - len(prompt))),
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seeds[i] if seeds is not None else seed + i, stop=tuple(stop))
            requests.append(GenerationRequest(prompt, params, n=num_samples))
        outputs = [[([], []) for _ in range(num_samples)] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for i, ev in self._run(requests, max(batch_size, num_samples)):
                if ev.finish_reason == "error":
                    raise RuntimeError(f"generation failed for prompt {i}: {ev.error}")
                if ev.token is None or (ev.mask == 1 and ev.token in self.terminal):
                    continue
                ids, mask = outputs[i][ev.sample]
                ids.append(ev.token)
                mask.append(ev.mask)
        finally:
            self.model.train(was_training)
        return outputs

    def _run(self, requests: list[GenerationRequest], rows: int) -> Iterator[tuple[int, TokenEvent]]:
        """Step a scheduler of `rows` rows until `requests` finish, yielding (request index, event) as they come.
        A failed batch step ends the requests with error events naming the cause (as a server replica's would).
        However it ends (done, failed, or the caller stops early) their rows are freed at once."""
        sched = self._scheduler_for(rows, max(len(r.prompt) + r.params.max_tokens for r in requests))
        for req in requests:
            sched.submit(req)
        try:
            while not all(req.finished.is_set() for req in requests):
                sched.run_step()
                for i, req in enumerate(requests):
                    while req.events:
                        yield i, req.events.popleft()
        finally:
            for req in requests:
                sched.release(req)
            if sched.has_work():
                self._scheduler = None

    def _scheduler_for(self, rows: int, needed: int) -> Scheduler:
        """A scheduler with `rows` rows and room for `needed` positions: the last one when it fits and is idle,
        else a new one (lengths rounded up to 256 so that a growing chat keeps its scheduler for a while)."""
        sched = self._scheduler
        if sched is not None and sched.batch_size == rows and sched.max_len >= needed and not sched.has_work():
            return sched
        self._scheduler = None  # free the old cache first
        max_len = min(self.model.config.sequence_len, round_up(needed, 256))
        self._scheduler = Scheduler(self.model, self.tokenizer, batch_size=rows, max_len=max_len, tools=self.tools,
                                    prefix_cache=self.prefix_store, cuda_graphs=self.cuda_graphs,
                                    step_tokens=self.step_tokens)
        return self._scheduler

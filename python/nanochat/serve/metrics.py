"""The server's Prometheus metrics (/metrics), through prometheus_client.

Two sources: what the handlers count as it happens (requests by HTTP status, prompt and generated tokens, client
disconnects, time to first token), kept in prometheus_client instruments; and what the replicas' schedulers, prefix
caches and the reply memory already count, read when the page is scraped (a collector), so that nothing is counted
twice. Each app has its own CollectorRegistry: several apps can live in one process (tests, benchmarks) without
sharing series, and the process-global registry stays untouched.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from nanochat.serve.history import ReplyMemory
from nanochat.serve.replicas import Replica

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format Prometheus scrapes; OpenMetrics is not offered

# prometheus_client would add a `<name>_created` gauge (its start time) beside every counter and histogram; the page
# never had those series and Prometheus does not need them (it detects counter resets). The switch is process-wide:
# the server is the only user of prometheus_client instruments in a nanochat process.
disable_created_metrics()


class ReplicaCollector:
    """Scheduler, prefix-cache and reply-memory counts summed over the replicas, read at each scrape."""

    def __init__(self, replicas: list[Replica], memory: ReplyMemory | None):
        self.replicas, self.memory = replicas, memory

    def collect(self):
        schedulers = [r.scheduler for r in self.replicas]
        stores = [s.prefix_store for s in schedulers if s.prefix_store is not None]
        lookups, hits = sum(s.lookups for s in stores), sum(s.hits for s in stores)
        yield GaugeMetricFamily("nanochat_queue_depth", "Requests waiting for a batch row.",
                                value=sum(s.num_waiting for s in schedulers))
        yield GaugeMetricFamily("nanochat_active_rows", "Batch rows holding a request (decoding or prefilling).",
                                value=sum(s.num_active_rows for s in schedulers))
        yield GaugeMetricFamily("nanochat_batch_rows", "Batch rows in all replicas.",
                                value=sum(s.batch_size for s in schedulers))
        yield CounterMetricFamily("nanochat_prefill_tokens_total",
                                  "Prompt tokens computed (not reused from the prefix cache).",
                                  value=sum(s.prefill_tokens for s in schedulers))
        yield CounterMetricFamily("nanochat_prefix_cache_lookups_total",
                                  "Admitted prompts looked up in the prefix cache.", value=lookups)
        yield CounterMetricFamily("nanochat_prefix_cache_hits_total", "Prompts that reused held KV entries.",
                                  value=hits)
        yield GaugeMetricFamily("nanochat_prefix_cache_hit_rate", "Hits over lookups since the start.",
                                value=hits / lookups if lookups else 0.0)
        yield CounterMetricFamily("nanochat_prefix_cache_reused_tokens_total",
                                  "Prompt tokens copied instead of computed.",
                                  value=sum(s.reused_tokens for s in stores))
        yield GaugeMetricFamily("nanochat_prefix_cache_tokens", "Tokens whose KV the prefix cache holds.",
                                value=sum(s.tokens_held for s in stores))
        memory = self.memory
        yield CounterMetricFamily("nanochat_reply_memory_hits_total", "History assistant messages rendered as the "
                                  "tokens this server generated for them.", value=memory.hits if memory else 0)
        yield CounterMetricFamily("nanochat_reply_memory_misses_total", "History assistant messages not held (read "
                                  "from their text).", value=memory.misses if memory else 0)


class ServerMetrics:
    """One app's registry: the handlers' instruments, then the replicas' collector. Counter names carry their
    `_total` suffix here as on the page (prometheus_client strips it from the family name and writes it back on
    every exposed line), so a grep for an exposed name finds its definition."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds; +Inf is added

    def __init__(self, replicas: list[Replica], memory: ReplyMemory | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("nanochat_requests_total", "Chat completion requests by HTTP status.", ["code"],
                                registry=self.registry)
        self.prompt_tokens = Counter("nanochat_prompt_tokens_total", "Prompt tokens of admitted requests.",
                                     registry=self.registry)
        self.completion_tokens = Counter("nanochat_completion_tokens_total", "Tokens generated.",
                                         registry=self.registry)
        self.disconnects = Counter("nanochat_client_disconnects_total",
                                   "Requests cancelled because the client went away.", registry=self.registry)
        self.registry.register(ReplicaCollector(replicas, memory))
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=self.TTFT_BUCKETS, registry=self.registry)

    def request(self, status: int) -> None:
        self.requests.labels(code=str(status)).inc()

    def render(self) -> str:
        """The page in the Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry).decode("utf-8")

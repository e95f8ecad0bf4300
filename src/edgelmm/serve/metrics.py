"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

Four kinds of numbers are enough to watch an edge server: how many requests and errors, how
many tokens, and how long until the first token and until the end. All updates happen on the
event-loop thread, so nothing here needs a lock.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{v}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(pairs) + "}" if pairs else ""


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        return lines + [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(self.values.items())]


class Gauge:
    """A value read when scraped (queue depth, running requests)."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class Total:
    """A counter kept elsewhere (read when scraped)."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter", f"{self.name} {self.read():g}"]


def prefix_cache_metrics(cache: Any) -> list[Total | Gauge]:
    """The torch backend's prefix cache (backends/prefix_cache.py) in /metrics."""
    return [
        Total("edgelmm_prefix_cache_hits_total", "Prompts that found a cached prefix.", lambda: cache.hits),
        Total("edgelmm_prefix_cache_misses_total", "Prompts that found none.", lambda: cache.misses),
        Total("edgelmm_prefix_cache_hit_tokens_total", "Prompt tokens read from the cache.", lambda: cache.hit_tokens),
        Total("edgelmm_prefix_cache_lookup_tokens_total", "Prompt tokens looked up.", lambda: cache.lookup_tokens),
        Total("edgelmm_prefix_cache_evictions_total", "Blocks evicted for the byte budget.", lambda: cache.evictions),
        Gauge("edgelmm_prefix_cache_bytes", "KV bytes the prefix cache holds.", lambda: cache.nbytes),
    ]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {total}"]


class Metrics:
    def __init__(self, queued: Callable[[], float], running: Callable[[], float]):
        self.requests = Counter("edgelmm_requests_total", "HTTP requests by route and status code.", ("route", "status"))
        self.errors = Counter("edgelmm_request_errors_total", "Requests answered with an error, by error type.", ("type",))
        self.prompt_tokens = Counter("edgelmm_prompt_tokens_total", "Prompt tokens processed (image tokens included).")
        self.generation_tokens = Counter("edgelmm_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("edgelmm_time_to_first_token_seconds", "From request arrival to the first generated token.")
        self.latency = Histogram("edgelmm_request_latency_seconds", "From request arrival to the last byte of the answer.")
        self.gauges = (
            Gauge("edgelmm_requests_waiting", "Requests queued for the engine.", queued),
            Gauge("edgelmm_requests_running", "Requests in the model right now.", running),
        )
        self.extra: list[Counter | Gauge | Histogram | Total] = []  # what a server built on this one adds

    def render(self) -> str:
        parts = (self.requests, self.errors, self.prompt_tokens, self.generation_tokens, self.ttft, self.latency, *self.gauges,
                 *self.extra)
        return "\n".join(line for part in parts for line in part.render()) + "\n"

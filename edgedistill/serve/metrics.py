"""Prometheus text exposition for the server: counters, gauges and histograms with labels.

Small on purpose (no client library): the server owns one `Metrics`, bumps it from the event
loop thread, and `/metrics` renders it.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Callable

POLICY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[str, ...]


def _labels(names: tuple[str, ...], values: Labels, extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[Labels, float] = defaultdict(float)

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] += by

    @property
    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self.values or ({(): 0.0} if not self.label_names else {})
        out += [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(values.items())]
        return out


class Gauge:
    """A value read when scraped (queue depth, active streams)."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.help, self.buckets, self.label_names = name, help, buckets, labels
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.counts.items()):
            running = 0
            for bound, c in zip((*self.buckets, float("inf")), counts):
                running += c
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound:g}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {self.sums[key]:g}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return out


class Metrics:
    def __init__(self, queue_depth: Callable[[], float]):
        self.active_streams = 0
        self.requests = Counter("edgedistill_requests_total", "HTTP requests by route and status code.",
                                ("route", "status"))
        self.latency = Histogram("edgedistill_request_duration_seconds",
                                 "Time from request to the last byte of the response.", LATENCY_BUCKETS, ("route",))
        self.ttft = Histogram("edgedistill_time_to_first_token_seconds",
                              "Time from request to the first generated token.", TTFT_BUCKETS, ("route",))
        self.prompt_tokens = Counter("edgedistill_prompt_tokens_total", "Prompt tokens processed.")
        self.completion_tokens = Counter("edgedistill_completion_tokens_total", "Tokens generated.")
        self.queue_depth = Gauge("edgedistill_queue_depth", "Requests waiting for a generation slot.", queue_depth)
        self.streams = Gauge("edgedistill_active_streams", "Streaming responses in progress.",
                             lambda: self.active_streams)
        # Routing: think or not, escalate or not (serve/route.py).
        self.routed = Counter("edgedistill_routed_requests_total",
                              "Chat requests for the default model, routed by the policy.")
        self.escalations = Counter("edgedistill_escalations_total",
                                   "Routed requests handed to the large model, by why.", ("reason",))
        self.escalation_rate = Gauge("edgedistill_escalation_rate", "Escalations / routed requests so far.",
                                     lambda: self.escalations.total / max(1.0, self.routed.total))
        self.think = Counter("edgedistill_think_requests_total",
                             "Chat requests by think mode and who decided it (request or policy).",
                             ("mode", "decided_by"))
        self.think_rate = Gauge("edgedistill_think_rate", "Share of chat requests that thought so far.",
                                lambda: sum(v for k, v in self.think.values.items() if k[0] == "on")
                                / max(1.0, self.think.total))
        self.thinking_tokens = Counter("edgedistill_thinking_tokens_total", "Tokens written inside <think>.")
        self.budget_hits = Counter("edgedistill_think_budget_hits_total",
                                   "Generations whose thinking budget ran out (the server closed the block).")
        self.tokens_saved = Counter(
            "edgedistill_tokens_saved_vs_always_think_total",
            "Estimated thinking tokens not spent because the policy chose not to think: per such request, "
            "the mean thinking tokens of this server's thinking requests so far (the policy's budget, "
            "else 256, before any).")
        self.fallbacks = Counter("edgedistill_fallbacks_total",
                                 "Failures of one model answered by the other, by which model failed.", ("failed",))
        self.policy_latency = Histogram("edgedistill_policy_seconds",
                                        "Routing overhead per request: decide_think + confidence + bookkeeping.",
                                        POLICY_BUCKETS)

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.latency, self.ttft, self.prompt_tokens, self.completion_tokens,
                  self.queue_depth, self.streams, self.routed, self.escalations, self.escalation_rate, self.think,
                  self.think_rate, self.thinking_tokens, self.budget_hits, self.tokens_saved, self.fallbacks,
                  self.policy_latency):
            lines += m.render()
        return "\n".join(lines) + "\n"

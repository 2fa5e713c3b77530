"""A short soak: 8 concurrent clients (streamed and not) against `edgedistill serve` on a tiny real GGUF for
about 20 s: no errors, no hang, the server's RSS after warm-up grows at most 10%, and p95 latency in the last
window is not out of line with the first. bench/reliability.py runs the same for 5 minutes."""
from __future__ import annotations

import httpx

from reliability_kit import cli_server, soak


def test_short_soak_8_clients(tiny_f16_gguf):
    with cli_server(tiny_f16_gguf, "--no-ui", "--threads", "1", "--slots", "8", "--ctx", "256", "--log-level", "warning") as s:
        report = soak(s.url, server_pid=s.pid, clients=8, seconds=20, warmup_s=4, max_tokens=16)
        assert httpx.get(f"{s.url}/health").json() == {"status": "ok"}
        metrics = httpx.get(f"{s.url}/metrics").text
    assert report.errors == 0, report.error_samples
    assert report.requests > 50, report
    assert report.rss_growth_pct <= 10.0, report
    # Generous on a shared 2-core machine: a leak or queue build-up shows as a multiple, not as noise.
    assert report.p95_last_s <= 3 * report.p95_first_s + 0.25, report
    assert "edgedistill_active_streams 0" in metrics

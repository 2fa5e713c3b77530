"""Adaptive thinking and SLM-first / LLM-fallback routing: one calibrated policy (`policy.RoutingPolicy`)."""

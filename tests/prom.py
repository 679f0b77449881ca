"""Read Prometheus samples from a /metrics page, so a test can check a value, not just a name."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample called `name` (e.g. 'pdrouter_requests_total'), keyed by its label set."""
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def value(text: str, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels; 0.0 when it has not been created yet (a
    labelled counter appears at its first increment)."""
    return samples(text, name).get(frozenset(labels.items()), 0.0)

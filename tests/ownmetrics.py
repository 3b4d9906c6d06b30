"""Aegis's own metrics, as a scraper reads them from ``/-/metrics``."""

from __future__ import annotations

from aegisrun import fresh_get
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


async def own_metrics(port: int) -> list[Sample]:
    status, body = await fresh_get(f"http://127.0.0.1:{port}/-/metrics")
    assert status == 200, body[:200]
    return [
        sample
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (every process's, in one figure)."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )

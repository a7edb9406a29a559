"""Reading Prometheus text as a scraper does: series by name and labels, in any label order."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, series: str) -> float:
    """One series' value, written `name{label="value",...}` (0 while it does not exist yet)."""
    match = _SERIES.match(series)
    assert match, f"not a series: {series!r}"
    labels = frozenset(_LABEL.findall(match.group(2) or ""))
    return samples(text).get((match.group(1), labels), 0.0)


def names(text: str) -> set[str]:
    """The sample names an exposition has (`x_total`, `x_bucket`, ...)."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}

"""Prometheus building blocks that name no metric (the names are all in server/metrics.py): a
histogram cheap enough to observe per token, and the exposition that merges the engine core
process's families into the server process's."""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class CountedHistogram:
    """A histogram of one series that takes one value observed `count` times in one call (one
    step's LoRA tokens: O(distinct values) a step, where prometheus_client's Histogram takes a
    call per observation, i.e. per token). Exposed as that Histogram would be, less `_created`.
    `labelnames`: the series' labels, their values given once by `set_labels` ("" until then)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry,
                 labelnames: tuple[str, ...] = ()):
        self.name, self.documentation = name, documentation
        self.labelnames = labelnames
        self._label_values = ("",) * len(labelnames)
        self._bounds = (*sorted(buckets), math.inf)
        self._counts = [0] * len(self._bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()  # observed on one thread, collected on a scrape's
        registry.register(self)

    def set_labels(self, *values: str) -> None:
        self._label_values = tuple(values)

    def observe(self, value: float, count: int = 1) -> None:
        i = bisect.bisect_left(self._bounds, value)  # the first bound >= value (`le` is inclusive)
        with self._lock:
            self._counts[i] += count
            self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets = [(floatToGoString(b), c) for b, c in zip(self._bounds, itertools.accumulate(counts))]
        if not self.labelnames:
            yield HistogramMetricFamily(self.name, self.documentation, sum_value=total, buckets=buckets)
            return
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        family.add_metric(list(self._label_values), buckets, total)
        yield family

    describe = collect  # the registry learns the names (and refuses duplicates) at registration


def exposition(registry: CollectorRegistry, others: Iterable[Metric] = ()) -> bytes:
    """The text exposition of `registry`, with `others` (metric families of the same names
    collected in another process: the engine core's) merged in. Both processes define every
    metric, and each updates only its own series (the other's stay at 0), so a series present in
    both is the sum; a `_created` timestamp is the earlier one."""
    others = list(others)
    if not others:
        return generate_latest(registry)
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, Sample]] = {}
    for family in [*registry.collect(), *others]:
        if family.name not in merged:
            merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            values[family.name] = {}
        seen = values[family.name]
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            old = seen.get(key)
            if old is None:
                seen[key] = s
            elif s.name.endswith("_created"):
                seen[key] = old._replace(value=min(old.value, s.value))
            else:
                seen[key] = old._replace(value=old.value + s.value)
    for name, family in merged.items():
        family.samples = list(values[name].values())
    return generate_latest(_Families(list(merged.values())))


class _Families:
    """A collected set of families, in the shape `generate_latest` reads (a registry's `collect`)."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families

"""Prometheus metrics: every metric the gateway exports is defined here, and nowhere else.

Each app (``create_app``) has its own :class:`Metrics` with its own ``CollectorRegistry``, so
several apps in one process (tests) never share counts. ``GET /metrics`` renders them in the
Prometheus text format 0.0.4.

Several worker processes (``gateway serve --workers N``) use prometheus_client's multiprocess
mode: ``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at an emptied folder before the workers start
(prometheus_client reads the variable when it is first imported), every worker writes its values
there, and a scrape of any worker adds up the files of all of them.

Label values are bounded: ``partner`` is a loaded partner's name or ``(unknown)``, ``outcome`` is
one of the gateway's own outcome and error codes, ``kind`` an :data:`~gateway.events.EventKind`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.events import AttributionEvent

#: prometheus_client's own variable for multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The folder under the data folder that ``serve`` uses when it runs several workers.
MULTIPROC_FOLDER = "prometheus-multiproc"

#: The text exposition format 0.0.4, which every Prometheus server reads (the HTTP layer adds
#: ``; charset=utf-8``, as it does to every text/* type).
CONTENT_TYPE = "text/plain; version=0.0.4"

#: The partner label of a request for a partner no plugin provides: one value, whatever the URL.
UNKNOWN_PARTNER = "(unknown)"

#: Seconds. Postbacks take milliseconds; partners give up after about 2 s (Branch).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

#: An ignored answer's reason → its outcome.
IGNORED = {"organic": "ignored_organic", "restricted_network": "ignored_restricted"}


class Metrics:
    def __init__(self) -> None:
        # Label children looked up once (labels() is slow for per-request calls); the label
        # values are bounded (see above), so these stay small.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._event_children: dict[tuple[str, str, str], Any] = {}
        self.registry = CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.postbacks = Counter(
            "gateway_postbacks",
            "Postback requests answered, by partner and outcome.",
            ["partner", "outcome"],
            registry=self.registry,
        )
        self.postback_duration = Histogram(
            "gateway_postback_duration_seconds",
            "Time to answer a postback, by partner.",
            ["partner"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.events = Counter(
            "gateway_events",
            "Events received in postbacks (one per item of a batch), by partner, kind and result.",
            ["partner", "kind", "result"],
            registry=self.registry,
        )
        self.storage_errors = Counter(
            "gateway_storage_errors",
            "Storage operations that failed (the request answered 503, or the work was skipped).",
            registry=self.registry,
        )
        self.status_errors = Counter(
            "gateway_status_errors",
            "Status store (Redis or embedded) operations that failed or timed out.",
            registry=self.registry,
        )
        self.status_pending = Gauge(
            "gateway_status_pending",
            "Status updates (one per postback) kept in memory until the status store takes them.",
            registry=self.registry,
            multiprocess_mode="livesum",  # every live worker's own count, added up
        )
        # Publishing (gateway/publish/): only the process holding the outbox lease publishes.
        self.published = Counter(
            "gateway_published_events",
            "Events this process published downstream (a retried batch counts again).",
            registry=self.registry,
        )
        self.publish_errors = Counter(
            "gateway_publish_errors",
            "Publishing rounds that failed (engine or outbox unavailable); retried after a pause.",
            registry=self.registry,
        )
        self.publish_lag = Gauge(
            "gateway_publish_lag_seconds",
            "Age of the oldest event waiting in the outbox, as the publisher last saw it.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def observe_postback(self, partner: str, outcome: str, seconds: float) -> None:
        """``partner`` must already be a loaded partner's name or :data:`UNKNOWN_PARTNER`."""
        children = self._children.get((partner, outcome))
        if children is None:  # labels() is slow for a per-request call: looked up once
            children = self._children[(partner, outcome)] = (
                self.postbacks.labels(partner, outcome),
                self.postback_duration.labels(partner),
            )
        children[0].inc()
        children[1].observe(seconds)

    def count_events(
        self,
        partner: str,
        events: Sequence[AttributionEvent],
        results: Sequence[Mapping[str, Any] | None],
    ) -> None:
        """One count per event, with the result it was answered with."""
        for event, result in zip(events, results, strict=True):
            if result is not None:
                labels = (partner, event.kind, result_of(result))
                child = self._event_children.get(labels)
                if child is None:
                    child = self._event_children[labels] = self.events.labels(*labels)
                child.inc()

    def render(self) -> bytes:
        """The text exposition: this process's metrics, or every worker's in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def result_of(result: Mapping[str, Any]) -> str:
    """``accepted``, ``duplicate``, ``ignored_organic``, ``ignored_restricted`` or ``ignored``."""
    status = str(result.get("status"))
    if status == "ignored":
        return IGNORED.get(str(result.get("reason")), "ignored")
    return status


def prepare_multiprocess_dir(data_dir: str, workers: int) -> Path | None:
    """For ``serve``: with several workers, set ``PROMETHEUS_MULTIPROC_DIR`` (unless the operator
    did) to ``<data_dir>/prometheus-multiproc``; empty the folder of an earlier run's values.
    Must run before the workers start. Returns the folder, or None in single-process mode."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given and workers <= 1:
        return None
    folder = Path(given) if given else Path(data_dir).resolve() / MULTIPROC_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # only prometheus_client's files: the folder may be shared
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder

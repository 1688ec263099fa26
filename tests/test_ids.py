"""Event ids: version-7 UUIDs, time first, unique across processes."""

from __future__ import annotations

import multiprocessing
import uuid
from datetime import UTC, datetime, timedelta

from freezegun import freeze_time

from gateway.ids import new_event_id


def _ids_in_child(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([new_event_id() for _ in range(300)])


def test_an_id_is_a_version_7_uuid_of_the_current_millisecond() -> None:
    moment = datetime(2026, 12, 4, 10, 30, 5, 123456, tzinfo=UTC)
    with freeze_time(moment):
        event_id = new_event_id()
    assert len(event_id) == 32 and event_id == event_id.lower()
    parsed = uuid.UUID(hex=event_id)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert parsed.int >> 80 == int(moment.timestamp() * 1000)  # 48 bits of Unix milliseconds


def test_ids_sort_by_time_and_never_repeat() -> None:
    start = datetime(2026, 12, 4, 0, 0, 0, 500, tzinfo=UTC)  # mid-millisecond: no rounding
    made: list[str] = []
    with freeze_time(start) as clock:
        for _ in range(50):
            same_millisecond = [new_event_id() for _ in range(2000)]
            made += sorted(same_millisecond)  # within a millisecond the order is random
            clock.tick(timedelta(milliseconds=1))
    assert made == sorted(made)
    assert len({event_id[:12] for event_id in made}) == 50  # one time prefix per millisecond
    assert len(set(made)) == len(made) == 100_000


def test_a_forked_process_makes_other_ids() -> None:
    new_event_id()  # the parent's pool of random bits is filled
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    children = [context.Process(target=_ids_in_child, args=(queue,)) for _ in range(2)]
    for child in children:
        child.start()
    made = [new_event_id() for _ in range(300)] + queue.get(timeout=20) + queue.get(timeout=20)
    for child in children:
        child.join(timeout=20)
    assert len(set(made)) == 900

"""The postback flow of DESIGN.md §1, steps 2 to 8, apart from HTTP.

``Gateway`` holds what a running gateway needs (config, partners, storage, status) and turns one
authenticated postback into an :class:`Answer`: the status code and JSON body the partner gets.
Errors are raised as :class:`~gateway.errors.GatewayError` and answered by the HTTP layer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from gateway import body as reader
from gateway.config import Config, set_partner_enabled
from gateway.errors import (
    Conflict,
    GatewayError,
    MappingError,
    PluginFailure,
    StorageUnavailable,
)
from gateway.events import INSTALL_KINDS, AttributionEvent
from gateway.hookspecs import PartnerSpec
from gateway.ids import new_event_id
from gateway.keys import check_key
from gateway.keys import key_secret as configured_key_secret
from gateway.metrics import Metrics
from gateway.normalise import device_id, finalise, stable_key
from gateway.plugins import LoadedPartner
from gateway.ratelimit import Limiter, enforce
from gateway.reload import ConfigWatcher, live_part
from gateway.status import StatusNotes
from gateway.storage import ReplaceResult, Storage, StoreResult

log = logging.getLogger("gateway.postback")

#: How often a key's last-used time is written, at most (per key and process).
KEY_USE_EVERY = timedelta(seconds=60)

#: Longer dedupe keys are stored as their SHA-256.
MAX_DEDUPE_KEY = 200

# What may follow a restricted network's name: "Facebook Ads", "twitter_int", "X (Twitter)";
# not "-", so "X-Men Games" is not X.
_WORD_BREAK = re.compile(r"[\s_/()\[\].:,]")


#: What writes the events that pass the filters (step 7): ``Storage.store`` for a postback; a
#: replay passes ``Storage.replace`` to re-map stored events, or a dry run.
Writer = Callable[[Sequence[AttributionEvent]], Awaitable[Sequence[StoreResult | ReplaceResult]]]

#: A replace's outcome as a result status (a new event is "accepted", as for a postback).
_REPLACED = {"stored": "accepted", "updated": "updated", "unchanged": "unchanged"}


class Answer(msgspec.Struct):
    status_code: int
    body: dict[str, Any]
    outcome: str  # for logs: accepted, duplicate, ignored, batch


class Gateway:
    def __init__(
        self,
        config: Config,
        partners: Mapping[str, LoadedPartner],
        storage: Storage,
        status: StatusNotes,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.partners = partners
        self.storage = storage
        self.status = status
        self.metrics = metrics if metrics is not None else Metrics()
        self._restricted = [name.casefold() for name in config.restricted_networks]
        self._key_used: dict[str, datetime] = {}
        self.config_watcher: ConfigWatcher | None = None  # set while the app watches its file
        self.limiter: Limiter | None = None  # set while the app runs (gateway/ratelimit.py)

    @functools.cached_property
    def key_secret(self) -> bytes:
        """The secret API key hashes are keyed with (gateway/keys.py)."""
        return configured_key_secret(self.config)

    def set_partner_enabled(self, name: str, enabled: bool) -> None:
        """Switch a partner on or off in the watched config file; every process follows it."""
        if self.config_watcher is None:
            raise Conflict("no config file is being watched: start with GATEWAY_CONFIG set")
        set_partner_enabled(self.config_watcher.path, name, enabled)
        self.config_watcher.check()

    def apply_config(self, new: Config) -> None:
        """Take a reloaded config: what applies live is swapped in whole, in one assignment."""
        for name in sorted(set(new.partners) - set(self.partners)):
            log.warning("config names partner %r but no plugin provides it (restart to load a new"
                        " plugin)", name)  # fmt: skip
        config = live_part(self.config, new)
        self._restricted = [name.casefold() for name in config.restricted_networks]
        self.config = config

    # -- steps 2 to 8 -----------------------------------------------------------------------

    async def postback(
        self,
        partner: LoadedPartner,
        query_string: bytes,
        headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]],
    ) -> Answer:
        """Steps 2 to 8 for one request. ``read_body`` is called once, after a key sent in the
        query string or a header has been checked (a key in the body needs the body first)."""
        name = partner.spec.name
        authenticated = False
        try:
            query = reader.parse_query(query_string)
            key = reader.key_from_request(query, headers)
            if key is not None:
                key_id = await check_key(self.storage, name, key, self.key_secret)
                await self._note_key_use(key_id)
                authenticated = True
                await enforce(self.limiter, key_id, self.config.limits, self.metrics)
            body = await read_body()
            items = reader.parse_body(
                body, headers.get("content-type", ""), self.config.limits.max_batch_events
            )
            if key is not None:  # checked above
                reader.same_key_in_body(key, items)
            else:
                key = reader.key_from_body(items)
                key_id = await check_key(self.storage, name, key, self.key_secret)
                await self._note_key_use(key_id)
                authenticated = True
                await enforce(self.limiter, key_id, self.config.limits, self.metrics)
            payloads = reader.merge(query, items)
            batch = reader.is_batch(body)
            events = self.map_payloads(partner, payloads, batch=batch)
        except GatewayError as exc:
            self.count_refusal(name, exc, authenticated)
            raise
        return await self._filter_and_store(name, events, batch=batch)

    async def _note_key_use(self, key_id: str) -> None:
        """Keep each key's last-used time, written at most once a minute per key and process."""
        now = datetime.now(UTC)
        last = self._key_used.get(key_id)
        if last is not None and now - last < KEY_USE_EVERY:
            return
        self._key_used[key_id] = now
        try:
            await self.storage.touch_key(key_id, now)
        except StorageUnavailable as exc:
            self.metrics.storage_errors.inc()
            log.warning("last use of key %s not recorded: %s", key_id, exc.reason)

    def count_refusal(self, partner: str, exc: GatewayError, authenticated: bool) -> None:
        if exc.status_code == 401:
            self._record(partner, {"unauthorized": 1})
        elif exc.status_code == 429:  # transient: the partner retries; not "rejected"
            self._record(partner, {"rate_limited": 1})
        elif authenticated and exc.status_code < 500:
            self._record(partner, {"rejected": 1})

    def map_payloads(
        self,
        partner: LoadedPartner,
        payloads: list[dict[str, Any]],
        batch: bool,
        received_at: datetime | None = None,
    ) -> list[tuple[int, AttributionEvent]]:
        """Step 4 and 5: every payload mapped and normalised, or nothing (all-or-nothing).
        ``received_at`` defaults to now (a replay keeps an exported event's own)."""
        received_at = received_at or datetime.now(UTC)
        out: list[tuple[int, AttributionEvent]] = []
        for index, payload in enumerate(payloads):
            try:
                out.extend((index, e) for e in map_payload(partner.spec, payload, received_at))
            except MappingError as exc:
                if batch:
                    field = f"[{index}].{exc.field}"
                    raise MappingError(field, exc.reason.partition(": ")[2]) from None
                raise
            except Exception as exc:
                # A plugin bug, not bad input: answer 5xx so the partner retries and nothing is
                # lost once the plugin is fixed (the conformance kit keeps this from happening).
                log.exception("partner %s failed to map a payload", partner.spec.name)
                raise PluginFailure(
                    f"the {partner.spec.name} plugin failed on this payload; retry later"
                ) from exc
        return out

    def restricted(self, source: str | None) -> bool:
        """Whether ``source`` is a restricted network: an entry of ``restricted_networks``
        equal to it, or to its leading words (``Facebook Ads``, ``twitter_int``), any case."""
        if not source:
            return False
        # Invisible format characters (zero-width spaces…) must not hide a restricted name.
        visible = (  # (ASCII has no format characters: the common case skips the scan)
            source
            if source.isascii()
            else "".join(c for c in source if unicodedata.category(c) != "Cf")
        )
        folded = visible.casefold().strip()
        for name in self._restricted:
            if folded == name:
                return True
            if folded.startswith(name) and _WORD_BREAK.match(folded, len(name)):
                return True
        return False

    async def settle(
        self, events: Sequence[AttributionEvent], write: Writer | None = None
    ) -> tuple[list[dict[str, Any]], Counter[str]]:
        """Steps 6 and 7, without step 8 (status): organic events and those of restricted
        networks are ignored, the others written by ``write``, by default ``storage.store``
        (an event whose dedupe key is stored is a duplicate). One result per event, and counts
        by outcome: accepted, duplicate (``store``) or updated, unchanged (``replace``),
        ignored_organic, ignored_restricted."""
        results: list[dict[str, Any]] = [{} for _ in events]
        to_store: list[tuple[int, AttributionEvent]] = []
        counts: Counter[str] = Counter()
        for pos, event in enumerate(events):
            if not event.attributed:
                results[pos] = {"status": "ignored", "reason": "organic"}
                counts["ignored_organic"] += 1
            elif self.restricted(event.source):
                results[pos] = {"status": "ignored", "reason": "restricted_network"}
                counts["ignored_restricted"] += 1
            else:
                to_store.append((pos, event))
        if to_store:
            written = await (write or self.storage.store)([event for _, event in to_store])
            for (pos, event), result in zip(to_store, written, strict=True):
                if isinstance(result, StoreResult):
                    status = "accepted" if result.stored else "duplicate"
                else:
                    status = _REPLACED[result.outcome]
                counts[status] += 1
                results[pos] = {"status": status, "event_id": result.event_id}
                if status == "accepted":
                    results[pos]["kind"] = event.kind
        return results, counts

    async def _filter_and_store(
        self, partner: str, events: Sequence[tuple[int, AttributionEvent]], batch: bool
    ) -> Answer:
        results, counts = await self.settle([event for _, event in events])  # steps 6 and 7
        success_at = None
        for (_, event), result in zip(events, results, strict=True):
            if result["status"] == "accepted" and event.kind in INSTALL_KINDS:
                success_at = event.received_at or success_at

        self.metrics.count_events(partner, [event for _, event in events], results)
        self._record(partner, counts, success_at)  # step 8
        done = [r for r in results if r is not None]
        status_code = 202 if counts["accepted"] else 200
        if not done:
            return Answer(200, {"status": "ignored", "reason": "no_events"}, "ignored")
        if len(done) == 1 and not batch:
            return Answer(status_code, done[0], str(done[0]["status"]))
        overall = next(
            s for s in ("accepted", "duplicate", "ignored") if any(r["status"] == s for r in done)
        )
        body = {
            "status": overall,
            "accepted": counts["accepted"],
            "duplicate": counts["duplicate"],
            "ignored": counts["ignored_organic"] + counts["ignored_restricted"],
            "results": done,
        }
        return Answer(status_code, body, "batch")

    def _record(
        self, partner: str, counts: Mapping[str, int], success_at: datetime | None = None
    ) -> None:
        """Step 8. Status is bookkeeping: the update is noted and written within a moment
        (gateway/status/buffer.py); the answer never waits for it, nor fails with it."""
        self.status.note(partner, counts, success_at)


def map_payload(
    spec: PartnerSpec, payload: dict[str, Any], received_at: datetime | None = None
) -> list[AttributionEvent]:
    """The partner's mapping of one payload, completed by the core: normalised (§5), with its
    partner, a new event id, the receive time, the raw payload and a dedupe key (the plugin's, or
    a hash of the payload). Raises what the mapping raises; TypeError for a wrong return type."""
    mapped = spec.map(payload)
    events = [mapped] if isinstance(mapped, AttributionEvent) else list(mapped)
    received_at = received_at or datetime.now(UTC)
    out = []
    for n, event in enumerate(events):
        if not isinstance(event, AttributionEvent):
            raise TypeError(f"mapping returned {type(event).__name__}, not AttributionEvent")
        event = finalise(event)
        # The partner's own id, unless it is a placeholder ("null", "0", "{id}"): then a hash of
        # the payload, so distinct events never collapse into one.
        own_key = device_id(event.dedupe_key, "dedupe_key") if event.dedupe_key else None
        dedupe_key = own_key or stable_key(payload)
        if n and not own_key:
            dedupe_key = f"{dedupe_key}:{n}"
        if len(dedupe_key) > MAX_DEDUPE_KEY:  # storage indexes it: keep it short
            dedupe_key = "sha256:" + hashlib.sha256(dedupe_key.encode()).hexdigest()
        out.append(
            msgspec.structs.replace(
                event,
                partner=spec.name,
                event_id=new_event_id(),
                received_at=received_at,
                raw=payload,
                dedupe_key=dedupe_key,
            )
        )
    return out

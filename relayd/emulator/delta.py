"""The emulator's drive contents and Graph's delta query over them.

Each drive keeps its items and a log of which item changed, in order. A delta token is a position
in that log: `?token=latest` answers "nothing, and here is where now is"; no token enumerates every
item; a position returns the items changed since, each once, in its latest state (deleted ones
with their `deleted` facet). Pages hold `page_size` items and chain with `@odata.nextLink` to a
final `@odata.deltaLink`, as Graph's do.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web


@dataclass
class InjectedDeltaError:
    status: int
    code: str
    retry_after: float | None = None
    location: str | None = None


@dataclass
class ChangeLog:
    """One drive's items and the order in which they changed."""

    drive_id: str = field(default_factory=lambda: f"b!{uuid.uuid4().hex}")
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # item id of each change, oldest first
    errors: collections.deque[InjectedDeltaError] = field(default_factory=collections.deque)
    hold: asyncio.Event | None = None  # the next page stalls half-sent until this is set
    _since_cache: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def change(self, count: int = 1, *, delete: tuple[str, ...] = ()) -> list[str]:
        """Create `count` new files, and delete the given ids; return the ids that changed."""
        changed: list[str] = []
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for _ in range(count):
            number = len(self.items) + 1
            item_id = f"ITEM{number:07d}"
            self.items[item_id] = {
                "id": item_id,
                "name": f"file{number}.txt",
                "eTag": f'"{{{uuid.uuid4()}}},1"',
                "lastModifiedDateTime": now,
                "size": number,
                "file": {"mimeType": "text/plain"},
                "parentReference": {"driveId": self.drive_id, "path": "/drive/root:"},
            }
            changed.append(item_id)
        for item_id in delete:
            item = self.items[item_id]
            item.pop("file", None)
            item["deleted"] = {"state": "deleted"}
            item["lastModifiedDateTime"] = now
            changed.append(item_id)
        for item_id in changed:
            self.log.append(item_id)
            self.items[item_id]["relaydEmulatorChange"] = len(self.log)
        return changed

    def changed_between(self, since: int, upto: int) -> list[str]:
        """Distinct ids changed in (since, upto], ordered by their last change."""
        key = (since, upto)
        if key not in self._since_cache:
            last: dict[str, int] = {}
            for position in range(since, upto):
                last[self.log[position]] = position
            self._since_cache[key] = sorted(last, key=last.__getitem__)
        return self._since_cache[key]


def _select(item: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    if not fields:
        return item
    return {key: value for key, value in item.items() if key in fields or key == "id"}


async def answer_delta(
    request: web.Request, changes: ChangeLog, *, base_url: str, path: str, page_size: int
) -> web.StreamResponse:
    """One delta page for `request`, whose bearer token was already checked."""
    if changes.errors:
        error = changes.errors.popleft()
        headers = {}
        if error.retry_after is not None:
            headers["Retry-After"] = str(max(0, math.ceil(error.retry_after)))
        if error.location is not None:
            headers["Location"] = error.location
        body = {"error": {"code": error.code, "message": "Injected by the emulator."}}
        return web.json_response(body, status=error.status, headers=headers)

    token = request.query.get("token")
    select = [f for f in request.query.get("$select", "").split(",") if f]
    extra = {"$select": ",".join(select)} if select else {}

    def link(token: str) -> str:
        return f"{base_url}/{path}/root/delta?{urlencode({'token': token, **extra})}"

    if token == "latest":
        return web.json_response({"value": [], "@odata.deltaLink": link(str(len(changes.log)))})
    try:
        if token is None:  # a full enumeration, as of now
            kind, since, upto, offset = "f", 0, len(changes.log), 0
        elif token[0] in "fp":
            kind = token[0]
            since, upto, offset = (int(part) for part in token[1:].split("."))
        else:
            kind, since, upto, offset = "p", int(token), len(changes.log), 0
    except ValueError:
        body = {"error": {"code": "invalidRequest", "message": "Invalid token."}}
        return web.json_response(body, status=400)
    if upto > len(changes.log) or since > upto:
        body = {"error": {"code": "resyncRequired", "message": "Token from the future."}}
        return web.json_response(body, status=410)

    if kind == "f":
        ids = [i for i in list(changes.items)[offset : offset + page_size]]
        ids = [i for i in ids if "deleted" not in changes.items[i]]
        more = offset + page_size < len(changes.items)
    else:
        changed = changes.changed_between(since, upto)
        ids = changed[offset : offset + page_size]
        more = offset + page_size < len(changed)
    page: dict[str, Any] = {"value": [_select(changes.items[i], select) for i in ids]}
    if more:
        page["@odata.nextLink"] = link(f"{kind}{since}.{upto}.{offset + page_size}")
    else:
        page["@odata.deltaLink"] = link(str(upto))
    return await _respond(request, page, changes)


async def _respond(
    request: web.Request, page: dict[str, Any], changes: ChangeLog
) -> web.StreamResponse:
    body = json.dumps(page).encode()
    if changes.hold is None:
        return web.Response(body=body, content_type="application/json")
    # Send half the page, then stall: the client has the page in hand but not all of it.
    hold, changes.hold = changes.hold, None
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await hold.wait()
    await response.write(body[len(body) // 2 :])
    await response.write_eof()
    return response

"""`relayd discover`: the drives an account can watch, and a `drives:` block to paste.

Nobody should have to assemble `sites/contoso.sharepoint.com,{guid},{guid}/lists/{guid}` by
hand. The account's own token asks Graph what it can reach: its OneDrive (`/me/drive`), the
document libraries of the sites it follows (`/me/followedSites`) or finds (`/sites?search=`),
and the drives of its teams and Microsoft 365 groups (`/me/joinedTeams`,
`/me/memberOf/microsoft.graph.group`). Each drive is written as `resource: drives/{id}`, the
form relayd would resolve every other one to anyway.

The Graph calls are `Discovery`; everything after them (names, the block) is pure.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import yaml

from relayd.auth import AuthError
from relayd.config import Config, drive_address, is_name
from relayd.graph import GraphClient, GraphError, InvalidGraphResponse, TokenSource, retry_delay
from relayd.network import Network, describe_connection_error
from relayd.store import OUTBOX_FILE, OutboxError, open_store
from relayd.supervisor import token_provider

# A listing is interactive: a throttled request is asked again a few times, not forever.
THROTTLE_ATTEMPTS = 4
THROTTLE_WAIT_CAP = 30.0
MAX_PAGES = 1000  # a paging link that never ends is Graph's bug, not a reason to hang
PLACEHOLDER_WEBHOOK = "CHANGE-ME"
# Answers that leave one part out rather than end the listing: no access to a site or group
# (403), gone (404), and what a personal Microsoft account answers for SharePoint-only
# listings such as /me/followedSites (400, 501). 401 is the account's problem: it ends it.
SKIPPED = frozenset({400, 403, 404, 501})
NAME_LENGTH = 64


class DiscoverError(Exception):
    """The listing cannot go on; the message names the account and the request. Safe to print."""


@dataclass(frozen=True)
class FoundDrive:
    kind: str  # "onedrive", "library" (of a SharePoint site), "team" or "group"
    drive_id: str
    title: str  # what a person recognises: "Engineering / Documents"
    web_url: str
    suggested_name: str  # before it is made unique and valid

    @property
    def resource(self) -> str:
        return f"drives/{self.drive_id}"


@dataclass
class Listing:
    drives: list[FoundDrive] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped, and why
    # drives/{id} -> the configured drive already watching it as `me`, `groups/...` (the ids a
    # daemon resolved and stored in state_dir)
    resolved: dict[str, str] = field(default_factory=dict)

    def add(self, found: FoundDrive) -> None:
        # A team's library is also its site's: list each drive once, under the first finding.
        if all(known.drive_id != found.drive_id for known in self.drives):
            self.drives.append(found)


class _Skip(Exception):
    """An answer in SKIPPED for one part of the listing: that part is left out, with a note."""


class Discovery:
    """The Graph side of `relayd discover`, for one account."""

    def __init__(self, graph: GraphClient, token: TokenSource, account: str) -> None:
        self._graph = graph
        self._token = token
        self._account = account

    async def run(self, *, search: str | None = None) -> Listing:
        listing = Listing()
        await self._own_drive(listing)
        sites: dict[str, Mapping[str, Any]] = {}
        queries = [("/me/followedSites", "followed sites")]
        if search is not None:
            queries.append((f"/sites?search={quote(search)}", f"sites matching {search!r}"))
        for path, what in queries:
            try:
                async for site in self._all(path):
                    if isinstance(site.get("id"), str):
                        sites.setdefault(site["id"], site)
            except _Skip as skip:
                listing.notes.append(f"skipped {what}: {skip}")
        for site_id, site in sites.items():
            await self._site_libraries(listing, site_id, site)
        await self._group_drives(listing)
        return listing

    async def _own_drive(self, listing: Listing) -> None:
        try:
            drive = await self._get("/me/drive")
        except _Skip as skip:
            listing.notes.append(f"skipped the account's own OneDrive: {skip}")
            return
        drive_id = drive.get("id")
        if isinstance(drive_id, str):
            listing.add(
                FoundDrive(
                    "onedrive",
                    drive_id,
                    _text(drive.get("name"), "OneDrive"),
                    _text(drive.get("webUrl"), ""),
                    "onedrive",
                )
            )

    async def _site_libraries(
        self, listing: Listing, site_id: str, site: Mapping[str, Any]
    ) -> None:
        site_name = _text(site.get("displayName") or site.get("name"), site_id)
        try:
            async for drive in self._all(f"/sites/{quote(site_id, safe=',.')}/drives"):
                drive_id = drive.get("id")
                if not isinstance(drive_id, str):
                    continue
                library = _text(drive.get("name"), "Documents")
                listing.add(
                    FoundDrive(
                        "library",
                        drive_id,
                        f"{site_name} / {library}",
                        _text(drive.get("webUrl"), ""),
                        f"{site_name}-{library}",
                    )
                )
        except _Skip as skip:
            listing.notes.append(f"skipped site {site_name!r}: {skip}")

    async def _group_drives(self, listing: Listing) -> None:
        groups: dict[str, tuple[str, str]] = {}  # id -> (kind, display name)
        for path, kind in (
            ("/me/joinedTeams", "team"),
            ("/me/memberOf/microsoft.graph.group", "group"),
        ):
            try:
                async for group in self._all(path):
                    group_id = group.get("id")
                    if not isinstance(group_id, str) or group_id in groups:
                        continue
                    # Only Microsoft 365 groups have a drive; security groups would only 404.
                    if kind == "group" and "Unified" not in (group.get("groupTypes") or ()):
                        continue
                    groups[group_id] = (kind, _text(group.get("displayName"), group_id))
            except _Skip as skip:
                listing.notes.append(f"skipped {path}: {skip}")
        for group_id, (kind, name) in groups.items():
            try:
                drive = await self._get(f"/groups/{quote(group_id)}/drive")
            except _Skip as skip:
                listing.notes.append(f"skipped {kind} {name!r}: {skip}")
                continue
            drive_id = drive.get("id")
            if isinstance(drive_id, str):
                listing.add(
                    FoundDrive(
                        kind,
                        drive_id,
                        f"{name} / {_text(drive.get('name'), 'Documents')}",
                        _text(drive.get("webUrl"), ""),
                        name,
                    )
                )

    # -- requests -------------------------------------------------------------------------------

    async def _all(self, path: str) -> AsyncIterator[Mapping[str, Any]]:
        """Every item of a collection, following `@odata.nextLink` page by page."""
        url: str | None = f"{self._graph.base_url}{path}"
        pages = 0
        while url is not None:
            pages += 1
            if pages > MAX_PAGES:
                raise self._failed(path, f"more than {MAX_PAGES} pages; giving up")
            body = await self._fetch(url, path)
            items = body.get("value")
            if not isinstance(items, list):
                raise self._failed(path, "the answer has no 'value' list")
            for item in items:
                if isinstance(item, Mapping):
                    yield item
            link = body.get("@odata.nextLink")
            url = link if isinstance(link, str) and link else None

    async def _get(self, path: str) -> Mapping[str, Any]:
        return await self._fetch(f"{self._graph.base_url}{path}", path)

    async def _fetch(self, url: str, path: str) -> Mapping[str, Any]:
        attempt = 0
        while True:
            attempt += 1
            try:
                body = await self._graph.get_json(url, self._token)
            except GraphError as error:
                if error.status in SKIPPED:
                    raise _Skip(f"GET {_shown(url)}: {error}") from None
                if error.throttled and attempt < THROTTLE_ATTEMPTS:
                    await asyncio.sleep(min(retry_delay(attempt, error), THROTTLE_WAIT_CAP))
                    continue
                raise self._failed(url, str(error)) from None
            except InvalidGraphResponse as error:
                raise self._failed(url, str(error)) from None
            except AuthError as error:  # its message names the account already
                raise DiscoverError(str(error)) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                # A certificate or proxy problem is said with its host, as the daemon says it.
                reason = describe_connection_error(error) or str(error) or type(error).__name__
                raise self._failed(url, f"cannot reach Graph: {reason}") from None
            if not isinstance(body, Mapping):
                raise self._failed(url, "the answer is not a JSON object")
            return body

    def _failed(self, url: str, reason: str) -> DiscoverError:
        return DiscoverError(f"account {self._account!r}: GET {_shown(url)}: {reason}")


def _shown(url: str) -> str:
    """A request as the messages show it: the path, without the host or the query."""
    return urlsplit(url).path or url


def _text(value: object, default: str) -> str:
    # Display names end up in YAML comments: one line, no control characters.
    if not isinstance(value, str) or not value.strip():
        return default
    return "".join(char if char.isprintable() else " " for char in value).strip()


# -- the block to paste (pure) ------------------------------------------------------------------


def slug(text: str) -> str:
    """A valid relayd name from a display name: ASCII, lower case, '-' for the rest; pure."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-._")
    return name[:NAME_LENGTH].rstrip("-._") or "drive"


def unique_names(suggestions: Iterable[str], taken: Iterable[str] = ()) -> list[str]:
    """One valid name per suggestion, none equal to another or to a name `taken`; pure."""
    used = set(taken)
    names = []
    for suggestion in suggestions:
        base = slug(suggestion)
        name, number = base, 1
        while name in used:
            number += 1
            suffix = f"-{number}"
            name = base[: NAME_LENGTH - len(suffix)].rstrip("-._") + suffix
        assert is_name(name), name
        used.add(name)
        names.append(name)
    return names


def render(listing: Listing, config: Config, account: str) -> str:
    """The listing as YAML comments, then a `drives:` block ready to paste; pure."""
    configured = {**listing.resolved, **{drive.resource: drive.name for drive in config.drives}}
    new = [found for found in listing.drives if found.resource not in configured]
    names = unique_names(
        (found.suggested_name for found in new), (drive.name for drive in config.drives)
    )
    webhook, webhook_note = _webhook(config.webhooks)
    lines = [f"# What account {account!r} can watch: {len(listing.drives)} drives"]
    width = max((len(found.title) for found in listing.drives), default=0)
    for found in listing.drives:
        lines.append(f"#   {found.kind:<9} {found.title:<{width}}  {found.web_url}".rstrip())
        if found.resource in configured:
            lines.append(f"#             already in the config as {configured[found.resource]!r}")
    if not new:
        lines.append("# Nothing new to add.")
        return "\n".join(lines) + "\n"
    if webhook_note:
        lines.append(f"# {webhook_note}")
    lines.append("drives:")
    for found, name in zip(new, names, strict=True):
        entry = {"name": name, "account": account, "resource": found.resource, "webhook": webhook}
        lines.append(f"  # {found.title} ({found.kind})")
        text = yaml.safe_dump([entry], sort_keys=False, default_flow_style=False, width=1000)
        lines.extend(f"  {line}" for line in text.splitlines())
    return "\n".join(lines) + "\n"


def _webhook(webhooks: Mapping[str, object]) -> tuple[str, str | None]:
    if len(webhooks) == 1:
        return next(iter(webhooks)), None
    if not webhooks:
        return PLACEHOLDER_WEBHOOK, f"webhook: {PLACEHOLDER_WEBHOOK} until the config has one"
    known = ", ".join(sorted(webhooks))
    return PLACEHOLDER_WEBHOOK, f"webhook: replace {PLACEHOLDER_WEBHOOK} with one of {known}"


# -- the command --------------------------------------------------------------------------------


async def discover(config: Config, account: str, *, search: str | None = None) -> Listing:
    """List what `account` of `config` can watch, with the token the daemon would use."""
    settings = config.accounts.get(account)
    if settings is None:
        known = ", ".join(sorted(config.accounts)) or "none"
        raise DiscoverError(f"no account {account!r} in the config (accounts: {known})")
    # Connections go the daemon's way: its TLS trust (tls.ca_file) and its proxies.
    network = Network.from_environment(config.tls.ca_file)
    sign_in = network.sign_in_session(config.graph.proxy)
    tokens = token_provider(account, settings, config.state_dir, sign_in=sign_in)
    async with aiohttp.ClientSession(connector=network.connector()) as session:
        graph = GraphClient(
            session,
            config.graph.base_url,
            request_options=network.request_options(config.graph.base_url, config.graph.proxy),
        )
        listing = await Discovery(graph, tokens.token, account).run(search=search)
    listing.resolved = await resolved_drives(config)
    return listing


async def resolved_drives(config: Config) -> dict[str, str]:
    """`drives/{id}` -> name, for the configured drives whose resource (`me`, `groups/...`) a
    daemon has resolved: so that `me` is known to be the OneDrive the listing shows. Nothing
    when relayd never ran with this state_dir, or its store cannot be read now."""
    if config.store.url is None and not (config.state_dir / OUTBOX_FILE).exists():
        return {}
    found: dict[str, str] = {}
    try:
        async with open_store(config.store.url, config.state_dir, recover=False) as outbox:
            for drive in config.drives:
                stored = await outbox.drive_id(drive.name)
                if stored is not None and stored[0] == drive.resource:
                    found[drive_address(drive.resource, stored[1])] = drive.name
    except OutboxError:
        return {}  # only a nicety: the listing itself does not need it
    return found


def notes_text(notes: Sequence[str]) -> str:
    return "".join(f"relayd: note: {note}\n" for note in notes)

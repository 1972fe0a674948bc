"""The server's view of the sites: sampling with a deadline, metered send/receive, failures.

Flower's built-in node sampling waits forever for ``min_available_nodes``; a hospital federation
must instead wait a bounded time and then go on with who is there, or stop with a reason.
Every message that goes out and every reply that comes back is measured with
:func:`common.codec.message_nbytes` and booked per site, so traffic figures are real.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common.codec import message_nbytes
from server_app.progress import ServerProgress

log = logging.getLogger("dsfedmed.server")


class FederationStopped(RuntimeError):
    """Too few sites to go on; the reason is written to the run directory."""


def traffic_kind(message_type: str) -> str:
    """The bucket a message's bytes are booked under: profile, generator, pool,
    teacher, train or evaluate."""
    return {
        P.MSG_QUERY_PROFILE: "profile",
        P.MSG_TRAIN_GENERATOR: "generator",
        P.MSG_EVALUATE_POOL: "pool",
        P.MSG_TRAIN_TEACHER: "teacher",
    }.get(message_type, message_type.split(".", 1)[0])


@dataclass
class Traffic:
    down: dict[str, int] = field(default_factory=dict)  # server -> site bytes
    up: dict[str, int] = field(default_factory=dict)  # site -> server bytes
    by_kind: dict[str, int] = field(default_factory=dict)  # both ways, by message kind (+ "late")

    def add(self, site: str, down: int = 0, up: int = 0, kind: str = "") -> None:
        self.down[site] = self.down.get(site, 0) + down
        self.up[site] = self.up.get(site, 0) + up
        if kind:
            self.by_kind[kind] = self.by_kind.get(kind, 0) + down + up

    @property
    def total_down(self) -> int:
        return sum(self.down.values())

    @property
    def total_up(self) -> int:
        return sum(self.up.values())


@dataclass
class Exchange:
    """Outcome of one send: good replies by site, error reasons, and sites that never answered."""

    replies: dict[str, Message] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)  # the site's error code, by site
    timeouts: list[str] = field(default_factory=list)


class Federation:
    """Wraps a Flower ``Grid`` with deadline sampling, per-site naming and byte accounting."""

    def __init__(
        self,
        grid: Grid,
        *,
        poll_s: float = 1.0,
        progress: ServerProgress | None = None,
        link_mbps: float = 10.0,
        latency_s: float = 5.0,
        state_key: int = 0,
    ):
        self.grid = grid
        self.poll_s = poll_s
        self.progress = progress or ServerProgress(live=False)
        self.link_mbps = link_mbps
        self.latency_s = latency_s
        self.state_key = state_key  # the name sites keep their state under (see server_app.checkpoint)
        self.sites: dict[int, str] = {}  # node id -> site name, set after profiling
        self.traffic = Traffic()
        self._absent: set[str] = set()  # roster sites not connected when they were wanted
        # replies not in by their deadline: (message id -> node id, kind), booked as "late" when
        # they arrive, so every byte a site sent is counted
        self._late: dict[str, tuple[int, str]] = {}
        self.participation: dict[str, int] = {}  # site -> rounds it was asked to train in

    def sample(self, nodes: list[int], k: int, rnd: int, seed: int = 0) -> list[int]:
        """Partial participation: ``k`` of ``nodes`` for round ``rnd`` (all when ``k`` is 0 or not
        smaller), the sites asked least often so far first, ties broken by a seeded draw, so over a
        run every site is asked about equally often; the count is of being asked, answered or not."""
        if k <= 0 or k >= len(nodes):
            chosen = list(nodes)
        else:
            rng = random.Random(seed * 1_000_003 + rnd)
            order = sorted(nodes, key=lambda n: (self.participation.get(self.site_of(n), 0), rng.random()))
            chosen = sorted(order[:k])
        for n in chosen:
            self.participation[self.site_of(n)] = self.participation.get(self.site_of(n), 0) + 1
        return chosen

    def name_site(self, node_id: int, name: str) -> None:
        """Record a node's site name; traffic booked under its node id moves to the name."""
        self.sites[node_id] = name
        key = f"node-{node_id}"
        for book in (self.traffic.down, self.traffic.up):
            if key in book:
                book[name] = book.get(name, 0) + book.pop(key)

    def site_of(self, node_id: int) -> str:
        return self.sites.get(node_id, f"node-{node_id}")

    def wait_for_nodes(
        self, min_nodes: int, deadline_s: float, among: Iterable[int] | None = None
    ) -> list[int]:
        """Connected node ids once ``min_nodes`` are there, or all that came within the deadline.

        ``among`` restricts the count to known nodes (the roster).  Raises
        :class:`FederationStopped` when the deadline passes with fewer than ``min_nodes``.
        """
        wanted = set(among) if among is not None else None
        t_end = time.monotonic() + deadline_s
        last_log = 0.0
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if wanted is not None:
                nodes = [n for n in nodes if n in wanted]
            total = len(wanted) if wanted is not None else min_nodes
            if len(nodes) >= (total if wanted is not None else min_nodes):
                return nodes
            now = time.monotonic()
            if now >= t_end:
                if len(nodes) >= min_nodes:
                    self.mark_absent((wanted or set()) - set(nodes))
                    return nodes
                raise FederationStopped(
                    f"only {len(nodes)} site(s) connected after waiting {deadline_s:.0f} s; "
                    f"min-sites is {min_nodes}"
                )
            if now - last_log > 10:
                log.info("waiting for sites: %d/%d connected", len(nodes), max(total, min_nodes))
                last_log = now
            time.sleep(self.poll_s)

    def mark_absent(self, node_ids: Iterable[int]) -> None:
        """Book roster sites that were not connected when a round wanted them (a site that went
        away between rounds is never sent a message, so it cannot time out)."""
        self._absent.update(self.site_of(n) for n in node_ids)

    def take_absent(self) -> list[str]:
        """The sites booked absent since the last call (one metrics row's worth)."""
        out, self._absent = sorted(self._absent), set()
        return out

    def collect_late(self) -> int:
        """Pull replies that missed their deadline; their bytes are booked (up, under the kind
        "late" and their site) but the replies themselves are not used. Returns how many came."""
        if not self._late:
            return 0
        got = list(self.grid.pull_messages(list(self._late)))
        for rep in got:
            node, _ = self._late.pop(rep.metadata.reply_to_message_id, (rep.metadata.src_node_id, ""))
            self.traffic.add(self.site_of(node), up=message_nbytes(rep), kind="late")
        return len(got)

    def _push_and_pull(self, messages: list[Message], timeout_s: float) -> list[Message]:
        """Flower's send-and-receive, polling every ``poll_s`` and reporting who is still awaited."""
        first = messages[0].metadata
        label = f"{first.message_type} (round {first.group_id or 0})"
        pending = {
            mid: msg.metadata.dst_node_id
            for mid, msg in zip(self.grid.push_messages(messages), messages, strict=True)
        }
        total, replies, t0 = len(pending), [], time.monotonic()
        while True:
            got = list(self.grid.pull_messages(list(pending))) if pending else []
            for rep in got:
                pending.pop(rep.metadata.reply_to_message_id, None)
            replies += got
            elapsed = time.monotonic() - t0
            waiting = sorted(self.site_of(n) for n in pending.values())
            self.progress.exchange(label, total - len(pending), total, waiting, elapsed, timeout_s)
            if not pending or elapsed >= timeout_s:
                kind = traffic_kind(first.message_type)
                self._late.update({mid: (node, kind) for mid, node in pending.items()})
                return replies
            time.sleep(min(self.poll_s, max(0.0, timeout_s - elapsed)))

    def make(self, node_id: int, mtype: str, content: RecordDict, round_id: int = 0) -> Message:
        """A message for one site; its config record carries the run's state key."""
        if self.state_key:
            content = RecordDict(dict(content.items()))  # messages may share a content; never mutate it
            conf = dict(content.config_records.get(P.KEY_CONFIG, ConfigRecord()).items())
            content[P.KEY_CONFIG] = ConfigRecord({**conf, P.CFG_STATE_KEY: int(self.state_key)})
        return Message(content, dst_node_id=node_id, message_type=mtype, group_id=str(round_id))

    def deadline(self, largest_bytes: int, compute_s: float) -> float:
        """Seconds to wait for a send: the sites' compute time plus the largest message's transfer,
        both ways (a reply is assumed no larger), at ``link-mbps``, plus ``latency_s``."""
        return compute_s + 2 * largest_bytes * 8 / (self.link_mbps * 1e6) + self.latency_s

    def send(self, messages: Iterable[Message], timeout_s: float) -> Exchange:
        """Send the messages and collect replies until all answered or the deadline passed:
        ``timeout_s`` of compute plus the payload's transfer time (:meth:`deadline`)."""
        out = Exchange()
        messages = list(messages)
        self.collect_late()
        requests = [m.metadata.dst_node_id for m in messages]
        sizes = [message_nbytes(m) for m in messages]
        for msg, n in zip(messages, sizes, strict=True):
            kind = traffic_kind(msg.metadata.message_type)
            self.traffic.add(self.site_of(msg.metadata.dst_node_id), down=n, kind=kind)
        if not messages:
            return out
        timeout_s = self.deadline(max(sizes), timeout_s)
        replies = self._push_and_pull(messages, timeout_s)
        answered = set()
        for rep in replies:
            node_id = rep.metadata.src_node_id
            site = self.site_of(node_id)
            answered.add(node_id)
            self.traffic.add(site, up=message_nbytes(rep), kind=traffic_kind(rep.metadata.message_type))
            if rep.has_error():
                out.errors[site] = f"error {rep.error.code}: {rep.error.reason}"
                out.error_codes[site] = int(rep.error.code)
                log.warning("site %s replied with an error: %s", site, out.errors[site])
            else:
                out.replies[site] = rep
        for node_id in requests:
            if node_id not in answered:
                site = self.site_of(node_id)
                out.timeouts.append(site)
                log.warning("site %s did not answer within %.0f s", site, timeout_s)
        return out

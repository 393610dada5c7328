"""Cluster membership: which prefill, decode and colocated nodes a coordinator routes to.

Two sources, one interface (:class:`Membership`):

* :class:`StaticMembership`: the ``[[prefill]]``/``[[decode]]``/``[[colocated]]`` lists of the cluster
  TOML, handed over once. The default, and what ``pdgrpc up`` and ``make demo`` use: no etcd.
* :class:`pdgrpc.membership.etcd.EtcdMembership`: nodes register themselves in etcd under a lease
  (:class:`pdgrpc.membership.etcd.Registration`) and every coordinator watches the key prefix, so a
  node that starts is routed to within a second and one that dies leaves when its lease expires.

Protocol, in call order (the coordinator side):

1. ``await membership.start(on_change)``: ``on_change(records)`` is called with the whole membership
   (name -> :class:`NodeRecord`) once before ``start`` returns, then again after every change.
   The coordinator's NodePool adds and removes nodes to match.
2. ``membership.etcd_up``: False while the source cannot be reached; the last membership seen stays
   in force meanwhile (health checks still mark dead nodes unreachable).
3. ``await membership.close()``.

A node's identity travels as JSON (:meth:`NodeRecord.to_json`), never pickle: a coordinator must be
able to read what any node wrote, and must refuse what it cannot read rather than run it.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

ROLES = ("prefill", "decode", "colocated")
OnChange = Callable[[dict[str, "NodeRecord"]], None]


class RecordError(ValueError):
    """A membership value that is not a node record this version can read."""


@dataclass(frozen=True)
class NodeRecord:
    """What a node says about itself: enough for a coordinator to route to it and for an operator
    to see where it runs."""

    name: str
    role: str             # prefill, decode or colocated
    address: str          # host:port of its gRPC server, as coordinators reach it
    host: str = ""        # the machine it runs on (hostname)
    store: str = ""       # host:port of the KV store it writes to / reads from
    fingerprint: str = ""  # its model's fingerprint ("" before loaded or unknown)
    max_requests: int = 0  # capacity: requests it admits at once (running + queued)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "NodeRecord":
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordError(f"not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise RecordError("not a JSON object")
        known = {f.name: f.type for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}  # newer writers may add keys
        for key in ("name", "role", "address"):
            if not isinstance(values.get(key), str) or not values[key]:
                raise RecordError(f"missing or empty {key!r}")
        if values["role"] not in ROLES:
            raise RecordError(f"role must be one of {ROLES}, not {values['role']!r}")
        for key in ("host", "store", "fingerprint"):
            if not isinstance(values.get(key, ""), str):
                raise RecordError(f"{key!r} must be a string")
        cap = values.get("max_requests", 0)
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise RecordError("'max_requests' must be an integer >= 0")
        return cls(**values)


class Membership(abc.ABC):
    """A source of node records; see the module docstring for the protocol."""

    etcd_up: bool = True

    @abc.abstractmethod
    async def start(self, on_change: OnChange) -> None:
        """Deliver the membership to ``on_change`` now, and every change after."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop watching."""


class StaticMembership(Membership):
    """The node list of the cluster TOML: delivered once, never changes."""

    def __init__(self, records: list[NodeRecord]) -> None:
        self.records = {r.name: r for r in records}

    async def start(self, on_change: OnChange) -> None:
        on_change(dict(self.records))

    async def close(self) -> None:
        pass

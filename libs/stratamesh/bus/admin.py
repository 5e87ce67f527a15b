"""Topic and consumer-group administration (`strata topics`, and the base of dlq / replay).

Every function opens its own short-lived clients from :class:`Settings`, closes them on the
way out, and raises :class:`~stratamesh.errors.BrokerError` (within a bounded time) when the
broker cannot be reached.  Nothing here depends on a broker feature Tansu lacks:

* end offsets and lag use :func:`~stratamesh.bus.offsets.true_end_offsets`;
* group offsets are always fetched with an explicit partition list (Tansu drops the
  connection otherwise);
* topics are never described by name before they are known to exist (a by-name metadata
  request auto-creates the topic on Tansu);
* group membership first asks the coordinator to expire silent members (see
  :func:`describe_group`), because Tansu keeps a stopped aiokafka consumer listed as a member
  until some group request makes it notice the missed heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from stratamesh.bus.clients import (
    CONNECTION_ERRORS,
    broker_errors,
    connect_timeout_s,
    connection_config,
    producer_config,
    unreachable,
)
from stratamesh.bus.offsets import OffsetBounds, TopicNotFoundError, offset_bounds
from stratamesh.bus.topics import ALL_TOPICS, DLQ_SUFFIX, TopicSpec, dlq_of, shadow_of, topic
from stratamesh.config import Settings
from stratamesh.errors import BrokerError, ConfigError

__all__ = [
    "GroupActiveError",
    "GroupDescription",
    "GroupMember",
    "PartitionDescription",
    "PartitionLag",
    "TopicDescription",
    "TopicNotFoundError",
    "committed_offsets",
    "consumer_lag",
    "create_shadow_topic",
    "create_topic",
    "describe_group",
    "describe_topic",
    "ensure_topics",
    "group_is_active",
    "group_members",
    "group_offsets",
    "list_groups",
    "list_topics",
    "open_admin",
    "open_producer",
    "require_inactive",
]

log = structlog.get_logger("stratamesh.admin")

_TOPIC_ALREADY_EXISTS = 36
_GROUP_ID_NOT_FOUND = 69


class GroupActiveError(BrokerError):
    """The consumer group has active members; stop its consumers first."""


# --------------------------------------------------------------------------- clients


@contextlib.asynccontextmanager
async def open_admin(settings: Settings) -> AsyncIterator[Any]:
    """A started admin client, always closed on exit; :class:`BrokerError` if unreachable."""
    admin = AIOKafkaAdminClient(
        **connection_config(settings, suffix="-admin"),
        request_timeout_ms=settings.producer.request_timeout_ms,
    )
    try:
        async with asyncio.timeout(connect_timeout_s(settings)):
            await admin.start()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await admin.close()
        if isinstance(exc, (*CONNECTION_ERRORS, KafkaError)):
            raise unreachable(settings, exc) from exc
        raise
    try:
        async with broker_errors(settings, "admin request"):
            yield admin
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


@contextlib.asynccontextmanager
async def open_producer(settings: Settings) -> AsyncIterator[Any]:
    """A started plain producer (acks=all, no idempotence: Tansu lacks it), stopped on exit.

    Stopping flushes what is still buffered.
    """
    producer = AIOKafkaProducer(**producer_config(settings, suffix="-tools"))
    try:
        async with asyncio.timeout(connect_timeout_s(settings)):
            await producer.start()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        if isinstance(exc, (*CONNECTION_ERRORS, KafkaError)):
            raise unreachable(settings, exc) from exc
        raise
    try:
        async with broker_errors(settings, "producing"):
            yield producer
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()


# --------------------------------------------------------------------------- topics


async def _leaders(admin: Any) -> dict[str, dict[int, int]]:
    """topic → partition → leader, from a metadata request for *all* topics (by-name
    requests auto-create missing topics on Tansu)."""
    metadata = await admin._get_cluster_metadata(topics=None)
    out: dict[str, dict[int, int]] = {}
    for t in metadata.to_object()["topics"]:
        if t["error_code"] == 0:
            out[str(t["topic"])] = {int(p["partition"]): int(p["leader"]) for p in t["partitions"]}
    return out


async def _topic_partition_counts(admin: Any) -> dict[str, int]:
    return {name: len(parts) for name, parts in (await _leaders(admin)).items()}


async def list_topics(settings: Settings, *, include_internal: bool = False) -> dict[str, int]:
    """Every topic with its partition count, sorted by name (``__*`` topics hidden)."""
    async with open_admin(settings) as admin:
        counts = await _topic_partition_counts(admin)
    return {
        name: counts[name]
        for name in sorted(counts)
        if include_internal or not name.startswith("__")
    }


async def _create(admin: Any, topics: Sequence[NewTopic]) -> dict[str, bool]:
    """Create ``topics``; name → True if created now, False if it already existed."""
    if not topics:
        return {}
    response = await admin.create_topics(list(topics))
    out: dict[str, bool] = {}
    for err in response.to_object()["topic_errors"]:
        name, code = str(err["topic"]), int(err["error_code"])
        if code == 0:
            out[name] = True
        elif code == _TOPIC_ALREADY_EXISTS:
            out[name] = False
        else:
            raise BrokerError(
                f"cannot create topic {name!r}: error {code} {err.get('error_message') or ''}"
            )
    return out


def _new_topic(
    name: str, partitions: int, replication_factor: int, configs: Mapping[str, str] | None
) -> NewTopic:
    if partitions < 1:
        raise ConfigError(f"topic {name!r} needs at least one partition, not {partitions}")
    if replication_factor < 1:
        raise ConfigError(f"replication factor must be >= 1, not {replication_factor}")
    return NewTopic(name, partitions, replication_factor, topic_configs=dict(configs or {}))


async def ensure_topics(
    settings: Settings,
    names: Iterable[str] | None = None,
    *,
    partitions: int | None = None,
    replication_factor: int = 1,
) -> dict[str, bool]:
    """Create the registry topics and their DLQ twins (default: ``ALL_TOPICS``), idempotently.

    Partitions: ``partitions`` if given, else ``settings.topic_partitions``, else the
    :class:`TopicSpec`'s.  ``retention.ms`` comes from the spec.  Names outside the registry
    (shadow and DLQ names resolve to their source's spec) need ``partitions``.
    Returns name → True (created now) / False (existed already).  An existing topic is left
    as it is, even with another partition count (logged as a warning).
    """
    wanted = list(dict.fromkeys(ALL_TOPICS if names is None else names))
    specs: dict[str, tuple[int, dict[str, str]]] = {}
    for name in wanted:
        spec: TopicSpec | None
        try:
            spec = topic(name)
        except KeyError:
            spec = None
        count = partitions or settings.topic_partitions or (spec.partitions if spec else None)
        if count is None:
            raise ConfigError(f"{name!r} is not a registry topic: give its partition count")
        configs = {"retention.ms": str(spec.retention_ms)} if spec else {}
        specs[name] = (count, configs)
    async with open_admin(settings) as admin:
        existing = await _topic_partition_counts(admin)
        result = {name: False for name in wanted if name in existing}
        differ = {
            name: f"{existing[name]} (wanted {specs[name][0]})"
            for name in result
            if existing[name] != specs[name][0]
        }
        if differ:
            log.warning(
                "topics exist with another partition count; left as they are", topics=differ
            )
        todo = [
            _new_topic(name, specs[name][0], replication_factor, specs[name][1])
            for name in wanted
            if name not in existing
        ]
        result.update(await _create(admin, todo))
    return {name: result[name] for name in wanted}


async def create_topic(
    settings: Settings,
    name: str,
    partitions: int,
    *,
    replication_factor: int = 1,
    retention_ms: int | None = None,
    configs: Mapping[str, str] | None = None,
) -> bool:
    """Create one topic; True if created now, False if it existed already."""
    all_configs = dict(configs or {})
    if retention_ms is not None:
        all_configs["retention.ms"] = str(retention_ms)
    async with open_admin(settings) as admin:
        if name in await _topic_partition_counts(admin):
            return False
        created = await _create(
            admin, [_new_topic(name, partitions, replication_factor, all_configs)]
        )
    return created.get(name, False)


async def create_shadow_topic(
    settings: Settings, source: str, *, name: str | None = None, replication_factor: int = 1
) -> tuple[str, int]:
    """Create ``shadow.<source>`` (or ``name``) with the source's partition count.

    Idempotent.  Returns (name, partitions).  Raises :class:`BrokerError` if the target
    exists with fewer partitions than the source (records keep their partition number).
    """
    target = name or shadow_of(source)
    if target == source:
        raise ConfigError(f"cannot copy {source!r} into itself")
    async with open_admin(settings) as admin:
        counts = await _topic_partition_counts(admin)
        if source not in counts:
            raise TopicNotFoundError(f"topic {source!r} does not exist")
        need = counts[source]
        if target in counts:
            if counts[target] < need:
                raise BrokerError(
                    f"{target!r} has {counts[target]} partitions but {source!r} has {need}; "
                    f"delete {target!r} (or add partitions) and try again"
                )
            return target, counts[target]
        configs: dict[str, str] = {}
        with contextlib.suppress(KeyError):
            configs["retention.ms"] = str(topic(source).retention_ms)
        await _create(admin, [_new_topic(target, need, replication_factor, configs)])
    return target, need


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True, slots=True)
class GroupMember:
    member_id: str
    client_id: str
    client_host: str
    assignment: tuple[TopicPartition, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupDescription:
    group: str
    state: str
    protocol_type: str
    members: tuple[GroupMember, ...]

    @property
    def active(self) -> bool:
        return bool(self.members)


def _decode_assignment(raw: bytes) -> tuple[TopicPartition, ...]:
    if not raw:
        return ()
    try:
        from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

        decoded = ConsumerProtocolMemberAssignment.decode(raw)
        return tuple(TopicPartition(t, p) for t, parts in decoded.assignment for p in parts)
    except Exception:
        return ()


async def _expire_silent_members(admin: Any, group: str, coordinator: int) -> None:
    """Make the coordinator drop members whose session timed out.

    A LeaveGroup for a member id nobody has: Kafka answers UNKNOWN_MEMBER_ID and changes
    nothing; Tansu first evicts the members that missed their heartbeats (it only checks on
    group requests, and aiokafka never sends LeaveGroup to Tansu because Tansu's generation
    starts at 0).  Live members are not disturbed on either broker.
    """
    from aiokafka.protocol.group import LeaveGroupRequest

    probe = LeaveGroupRequest(group, f"strata-probe-{uuid.uuid4().hex[:12]}")
    with contextlib.suppress(Exception):
        await admin._send_request(probe, coordinator)


async def _describe_group(admin: Any, group: str, refresh: bool) -> GroupDescription:
    coordinator = await admin.find_coordinator(group)
    desc = await _describe_once(admin, group, coordinator)
    if refresh and desc.members:
        # Only a group with members can have silent ones (and probing an unknown group
        # would make Tansu record it).
        await _expire_silent_members(admin, group, coordinator)
        desc = await _describe_once(admin, group, coordinator)
    return desc


async def _describe_once(admin: Any, group: str, coordinator: int) -> GroupDescription:
    responses = await admin.describe_consumer_groups([group], group_coordinator_id=coordinator)
    for response in responses:
        for g in response.to_object()["groups"]:
            if g["group"] != group:
                continue
            code = int(g.get("error_code") or 0)
            if code == _GROUP_ID_NOT_FOUND:
                break
            if code:
                raise BrokerError(f"cannot describe consumer group {group!r}: error {code}")
            members = tuple(
                GroupMember(
                    str(m["member_id"]),
                    str(m.get("client_id") or ""),
                    str(m.get("client_host") or ""),
                    _decode_assignment(m.get("member_assignment") or b""),
                )
                for m in g["members"]
            )
            return GroupDescription(
                group, str(g.get("state") or ""), str(g.get("protocol_type") or ""), members
            )
    return GroupDescription(group, "Dead", "", ())


async def describe_group(
    settings: Settings, group: str, *, refresh: bool = True
) -> GroupDescription:
    """State and members of a consumer group (no members: nobody consumes with it now).

    With ``refresh`` (default) members whose session timed out are expired first, so a
    consumer that stopped is gone after its ``session_timeout_ms`` on Tansu too.
    """
    async with open_admin(settings) as admin:
        return await _describe_group(admin, group, refresh)


async def group_members(settings: Settings, group: str) -> list[GroupMember]:
    """The active members of ``group``."""
    return list((await describe_group(settings, group)).members)


async def group_is_active(settings: Settings, group: str) -> bool:
    """True while some consumer is a member of ``group``."""
    return (await describe_group(settings, group)).active


async def require_inactive(settings: Settings, group: str, what: str) -> None:
    """Raise :class:`GroupActiveError` if ``group`` has members (``what`` names the action)."""
    desc = await describe_group(settings, group)
    if desc.active:
        ids = ", ".join(m.member_id for m in desc.members[:5])
        raise GroupActiveError(
            f"cannot {what}: consumer group {group!r} has {len(desc.members)} active "
            f"member(s) ({ids}); stop the service's consumers first (a stopped consumer "
            "counts as gone once its session timeout has passed)"
        )


async def list_groups(settings: Settings) -> list[str]:
    """Names of every consumer group the broker knows."""
    async with open_admin(settings) as admin:
        groups = await admin.list_consumer_groups()
    return sorted({str(g[0]) for g in groups})


async def _committed(
    admin: Any, group: str, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, tuple[int | None, str]]:
    """Committed (offset or None, metadata) per partition; partitions always passed explicitly."""
    if not tps:
        return {}
    raw = await admin.list_consumer_group_offsets(group, partitions=list(tps))
    out: dict[TopicPartition, tuple[int | None, str]] = {}
    for tp in tps:
        om = raw.get(tp)
        offset = int(om.offset) if om is not None and om.offset is not None else -1
        out[tp] = (offset if offset >= 0 else None, str(om.metadata or "") if om else "")
    return out


async def committed_offsets(
    settings: Settings, group: str, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, tuple[int | None, str]]:
    """Committed (offset or None, metadata) of ``group`` per partition (Tansu keeps no metadata)."""
    tps = list(dict.fromkeys(partitions))
    async with open_admin(settings) as admin:
        return await _committed(admin, group, tps)


async def group_offsets(settings: Settings, group: str, topic_name: str) -> dict[int, int | None]:
    """partition → committed offset of ``group`` on ``topic_name`` (None: nothing committed)."""
    async with open_admin(settings) as admin:
        counts = await _topic_partition_counts(admin)
        if topic_name not in counts:
            raise TopicNotFoundError(f"topic {topic_name!r} does not exist")
        tps = [TopicPartition(topic_name, p) for p in range(counts[topic_name])]
        committed = await _committed(admin, group, tps)
    return {tp.partition: committed[tp][0] for tp in tps}


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """``lag`` counts from the committed offset, or from the beginning when nothing is
    committed (the mesh's consumers start at the earliest record)."""

    partition: int
    committed: int | None
    begin: int
    end: int

    @property
    def lag(self) -> int:
        start = self.begin if self.committed is None else max(self.committed, self.begin)
        return max(0, self.end - start)


async def consumer_lag(settings: Settings, group: str, topic_name: str) -> dict[int, PartitionLag]:
    """partition → committed offset, true end and lag of ``group`` on ``topic_name``."""
    committed = await group_offsets(settings, group, topic_name)
    bounds = await offset_bounds(settings, [TopicPartition(topic_name, p) for p in committed])
    return {
        tp.partition: PartitionLag(tp.partition, committed[tp.partition], b.begin, b.end)
        for tp, b in bounds.items()
    }


# --------------------------------------------------------------------------- describe


@dataclass(frozen=True, slots=True)
class PartitionDescription:
    partition: int
    begin: int
    end: int
    reported_end: int
    leader: int | None = None

    @property
    def count(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class TopicDescription:
    name: str
    partitions: tuple[PartitionDescription, ...]
    spec: TopicSpec | None
    dlq: str | None
    dlq_exists: bool
    groups: dict[str, tuple[PartitionLag, ...]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(p.count for p in self.partitions)


async def describe_topic(
    settings: Settings, name: str, *, groups: Sequence[str] | None = None, all_groups: bool = False
) -> TopicDescription:
    """Partitions with true end offsets, the registry spec, the DLQ twin and, if asked,
    committed offsets and lag of ``groups`` (or of every group that committed on the topic)."""
    async with open_admin(settings) as admin:
        all_leaders = await _leaders(admin)
        if name not in all_leaders:
            raise TopicNotFoundError(
                f"topic {name!r} does not exist; `strata topics list` shows the existing topics"
            )
        counts = {t: len(parts) for t, parts in all_leaders.items()}
        leaders = all_leaders[name]
        tps = [TopicPartition(name, p) for p in range(counts[name])]
        wanted = list(groups or ())
        if all_groups:
            wanted += [str(g[0]) for g in await admin.list_consumer_groups()]
        committed = {g: await _committed(admin, g, tps) for g in dict.fromkeys(wanted)}
    bounds: dict[TopicPartition, OffsetBounds] = await offset_bounds(settings, tps)
    spec: TopicSpec | None
    try:
        spec = topic(name)
    except KeyError:
        spec = None
    dlq = None if name.endswith(DLQ_SUFFIX) else dlq_of(name)
    lags: dict[str, tuple[PartitionLag, ...]] = {}
    for g, offsets in committed.items():
        if all_groups and g not in (groups or ()) and all(o is None for o, _ in offsets.values()):
            continue
        lags[g] = tuple(
            PartitionLag(tp.partition, offsets[tp][0], bounds[tp].begin, bounds[tp].end)
            for tp in tps
        )
    return TopicDescription(
        name=name,
        partitions=tuple(
            PartitionDescription(
                tp.partition,
                bounds[tp].begin,
                bounds[tp].end,
                bounds[tp].reported_end,
                leaders.get(tp.partition),
            )
            for tp in tps
        ),
        spec=spec,
        dlq=dlq,
        dlq_exists=dlq is not None and dlq in counts,
        groups=lags,
    )

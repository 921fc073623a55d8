"""The connector's control messages, one small class per kind, parsed once from the
msgpack dict a transport notif carries (`parse`) and written back with `to_dict`.
Producer-bound kinds derive from `ToProducer`, consumer-bound ones from `ToConsumer`. No message
says where its sender is: P answers the peer the transport received it from (an `addr` that an
older peer still sends is ignored)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

__all__ = ["Message", "ToProducer", "ToConsumer", "Release", "Cancel", "Want", "HeldQuery", "SumQuery",
           "Landed", "Abort", "Held", "Sums", "parse", "BadMessage"]


class BadMessage(ValueError):
    """A notif that claims to be a connector message but does not have that kind's fields."""


def _int(v: Any, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise BadMessage(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise BadMessage(f"{what} must be a list of integers, got {type(v).__name__}")
    return tuple(_int(x, what) for x in v)


def _opt_str(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise BadMessage(f"{what} must be a string, got {v!r}")
    return v


@dataclass(frozen=True)
class Message:
    """One control message about request `req` (the producer's request id)."""

    kind: ClassVar[str] = "?"
    req: str

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"p2pkv": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "Message":
        return cls(req=raw["req"])


class ToProducer(Message):
    """Sent by a consumer (D) to the producer (P) that holds `req`."""


class ToConsumer(Message):
    """Sent by a producer (P) to the consumer (D) loading `req`."""


@dataclass(frozen=True)
class Release(ToProducer):
    """Pull: D has read the blocks (`ok`: and they were good). P frees them once `of` releases
    came: with tensor parallelism several D ranks read one P rank, each releasing once."""

    kind: ClassVar[str] = "release"
    ok: bool = True
    of: int = 1

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "Release":
        return cls(raw["req"], bool(raw.get("ok", True)), _int(raw.get("of", 1), "release.of", 1))


@dataclass(frozen=True)
class Cancel(ToProducer):
    """D will not load `req` (gave up, or needs none of it): P frees the blocks now."""

    kind: ClassVar[str] = "cancel"


@dataclass(frozen=True)
class Want(ToProducer):
    """Push: D's block ids for `req`; P writes its blocks `[offset:]` into them, in the D that sent this."""

    kind: ClassVar[str] = "want"
    blocks: tuple[int, ...] = ()
    offset: int = 0
    load: str = ""  # D's own name for the load, echoed in P's answers (`to`): two P may share a `req`

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "Want":
        return cls(raw["req"], _ints(raw.get("blocks"), "want.blocks"), _int(raw.get("offset", 0), "want.offset"),
                   _opt_str(raw.get("load"), "want.load"))


@dataclass(frozen=True)
class HeldQuery(ToProducer):
    """Pull: D read `req`; did P still hold it? P answers `Held` to the D that asked."""

    kind: ClassVar[str] = "held?"


@dataclass(frozen=True)
class SumQuery(ToProducer):
    """Pull with checksums: the CRC32 of P's `blocks` per layer, answered as `Sums` to the D that asked."""

    kind: ClassVar[str] = "sum?"
    blocks: tuple[int, ...] = ()

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "SumQuery":
        return cls(raw["req"], _ints(raw.get("blocks"), "sum?.blocks"))


@dataclass(frozen=True)
class Landed(ToConsumer):
    """Push: `layer` of `req` has landed in D's first `n` blocks (with their CRC32s if checksumming)."""

    kind: ClassVar[str] = "landed"
    layer: int = 0
    n: int = 0
    sums: tuple[int, ...] | None = None
    to: str = ""  # the Want's `load`

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "Landed":
        sums = raw.get("sums")
        return cls(raw["req"], _int(raw.get("layer"), "landed.layer"), _int(raw.get("n"), "landed.n"),
                   None if sums is None else _ints(sums, "landed.sums"), _opt_str(raw.get("to"), "landed.to"))


@dataclass(frozen=True)
class Abort(ToConsumer):
    """Push: P gave up writing `req` (`reason` says why); D recomputes."""

    kind: ClassVar[str] = "abort"
    reason: str = "push failed"
    to: str = ""  # the Want's `load`

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "Abort":
        return cls(raw["req"], str(raw.get("reason") or "push failed"), _opt_str(raw.get("to"), "abort.to"))


@dataclass(frozen=True)
class Held(ToConsumer):
    """Pull: P's answer to `HeldQuery`: `gone` if it had freed `req` before D's read."""

    kind: ClassVar[str] = "held"
    gone: bool = False

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "Held":
        return cls(raw["req"], bool(raw.get("gone")))


@dataclass(frozen=True)
class Sums(ToConsumer):
    """Pull: P's answer to `SumQuery`: per layer, the CRC32 of each asked block; `gone` as in `Held`."""

    kind: ClassVar[str] = "sum"
    sums: tuple[tuple[int, ...], ...] = ()
    gone: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "sums": [list(s) for s in self.sums]}

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> "Sums":
        layers = raw.get("sums") or []
        if not isinstance(layers, (list, tuple)):
            raise BadMessage(f"sum.sums must be a list of lists, got {type(layers).__name__}")
        return cls(raw["req"], tuple(_ints(s, "sum.sums") for s in layers), bool(raw.get("gone")))


KINDS: dict[str, type[Message]] = {c.kind: c for c in (Release, Cancel, Want, HeldQuery, SumQuery,
                                                           Landed, Abort, Held, Sums)}


def parse(raw: dict[str, Any]) -> Message | None:
    """The typed message in a notif, None if it is not a connector message, BadMessage if malformed."""
    cls = KINDS.get(raw.get("p2pkv"))  # type: ignore[arg-type]
    if cls is None:
        return None
    if not isinstance(raw.get("req"), str):
        raise BadMessage(f"{cls.kind} message without a string request id (req={raw.get('req')!r})")
    return cls._parse(raw)

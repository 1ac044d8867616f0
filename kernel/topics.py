"""Topic patterns for publish/subscribe, with AMQP topic-exchange semantics.

A topic is a dot-separated list of segments, ``papers.new.arxiv``. A pattern is a topic in
which a whole segment may be a wildcard: ``*`` matches exactly one segment, ``#`` matches
zero or more. So ``papers.*`` matches ``papers.new`` but not ``papers`` or ``papers.new.x``;
``papers.#`` matches all three; ``#`` matches every topic.

A segment is one or more letters, digits or ``_ - : @ + /``; matching is case-sensitive.
Anything else (an empty segment, a space, a wildcard inside a word such as ``pa*``, a
wildcard in a published topic) raises ``TopicError``.

``TopicTable`` keeps the patterns in a trie over segments, with ``*`` and ``#`` as edges of
their own. ``match`` walks the trie one topic segment at a time, carrying the set of nodes
reached so far (a node reached through ``#`` stays in the set, absorbing segments), so its
cost grows with the topic's length and the wildcards on the way, not with the number of
patterns. Each subscriber is returned once however many of its patterns match.

Single writer: a table belongs to one thread (the agent host's event loop); it has no lock.
"""

from __future__ import annotations

__all__ = [
    "MAX_TOPIC_CHARS",
    "TopicError",
    "TopicTable",
    "check_pattern",
    "check_topic",
    "split_pattern",
]

import re
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

#: Longest topic or pattern, in characters.
MAX_TOPIC_CHARS: Final = 255

_SEGMENT: Final = re.compile(r"[\w\-:@+/]+")
_WILDCARDS: Final = frozenset({"*", "#"})

S = TypeVar("S", bound=Hashable)


class TopicError(ValueError):
    """Raised by ``check_topic``, ``check_pattern`` and ``TopicTable`` methods for a
    malformed topic or pattern; the message names the offending segment."""


def _split(text: str, *, wildcards: bool) -> tuple[str, ...]:
    kind = "pattern" if wildcards else "topic"
    if not isinstance(text, str):
        raise TopicError(f"a {kind} is a str, not {type(text).__qualname__}")
    if not text:
        raise TopicError(f"empty {kind}")
    if len(text) > MAX_TOPIC_CHARS:
        raise TopicError(f"{kind} longer than {MAX_TOPIC_CHARS} characters: {text[:40]!r}...")
    segments = tuple(text.split("."))
    for segment in segments:
        if wildcards and segment in _WILDCARDS:
            continue
        if not segment:
            raise TopicError(f"empty segment in {kind} {text!r}")
        if _SEGMENT.fullmatch(segment) is None:
            what = "wildcard" if segment in _WILDCARDS else "segment"
            raise TopicError(
                f"bad {what} {segment!r} in {kind} {text!r}: a segment is letters, digits or "
                f"_-:@+/" + (", or a whole * or #" if wildcards else "")
            )
    return segments


def check_topic(topic: str) -> tuple[str, ...]:
    """Validate a published topic (no wildcards) and return its segments.

    Raises:
        TopicError: malformed topic.
    """
    return _split(topic, wildcards=False)


def split_pattern(pattern: str) -> tuple[str, ...]:
    """Validate a subscription pattern and return its segments.

    Raises:
        TopicError: malformed pattern.
    """
    return _split(pattern, wildcards=True)


def check_pattern(pattern: str) -> str:
    """Validate a subscription pattern and return it unchanged. Raises ``TopicError``."""
    split_pattern(pattern)
    return pattern


class _Node(Generic[S]):
    """One trie node: the patterns that end here, and edges by segment (``*`` and ``#``
    are edges like any other; ``hash`` caches the ``#`` edge for the match walk)."""

    __slots__ = ("absorbs", "children", "hash", "here")

    def __init__(self, absorbs: bool = False) -> None:
        self.absorbs = absorbs  # reached through a '#' edge: may swallow more segments
        self.children: dict[str, _Node[S]] = {}
        self.hash: _Node[S] | None = None  # == children.get("#")
        self.here: set[S] = set()  # subscribers whose pattern ends at this node

    def empty(self) -> bool:
        return not self.children and not self.here


class TopicTable(Generic[S]):
    """Subscriptions of subscribers (any hashable: agent ids in the host) to patterns."""

    def __init__(self) -> None:
        self._root: _Node[S] = _Node()
        self._patterns: dict[S, set[str]] = {}  # subscriber -> its patterns

    def __len__(self) -> int:
        """Number of (pattern, subscriber) subscriptions."""
        return sum(len(p) for p in self._patterns.values())

    def patterns(self, subscriber: S) -> frozenset[str]:
        """The patterns ``subscriber`` is subscribed to."""
        return frozenset(self._patterns.get(subscriber, ()))

    def subscribe(self, pattern: str, subscriber: S) -> bool:
        """Subscribe ``subscriber`` to ``pattern``; returns False if it already was.

        Raises:
            TopicError: malformed pattern.
        """
        segments = split_pattern(pattern)
        node = self._root
        for segment in segments:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Node(absorbs=segment == "#")
                if segment == "#":
                    node.hash = child
            node = child
        if subscriber in node.here:
            return False
        node.here.add(subscriber)
        self._patterns.setdefault(subscriber, set()).add(pattern)
        return True

    def unsubscribe(self, pattern: str, subscriber: S) -> bool:
        """Remove one subscription; returns False if there was none.

        Raises:
            TopicError: malformed pattern.
        """
        segments = split_pattern(pattern)
        path = [self._root]
        for segment in segments:
            child = path[-1].children.get(segment)
            if child is None:
                return False
            path.append(child)
        if subscriber not in path[-1].here:
            return False
        path[-1].here.discard(subscriber)
        mine = self._patterns[subscriber]
        mine.discard(pattern)
        if not mine:
            del self._patterns[subscriber]
        self._prune(path, segments)
        return True

    def unsubscribe_all(self, subscriber: S) -> int:
        """Remove every subscription of ``subscriber``; returns how many there were."""
        patterns = self._patterns.get(subscriber)
        if not patterns:
            return 0
        count = len(patterns)
        for pattern in list(patterns):
            self.unsubscribe(pattern, subscriber)
        return count

    def _prune(self, path: list[_Node[S]], segments: tuple[str, ...]) -> None:
        """Drop the nodes of ``path`` that no longer lead to any subscription."""
        for depth in range(len(segments), 0, -1):
            node, parent = path[depth], path[depth - 1]
            if not node.empty():
                break
            segment = segments[depth - 1]
            del parent.children[segment]
            if segment == "#":
                parent.hash = None

    def match(self, topic: str) -> set[S]:
        """The subscribers with at least one pattern matching ``topic``, each once.

        Raises:
            TopicError: malformed topic (wildcards are not allowed in a topic).
        """
        segments = check_topic(topic)
        current = self._closure([self._root])
        for segment in segments:
            step: list[_Node[S]] = []
            for node in current:
                if node.absorbs:  # reached through '#': it may swallow this segment too
                    step.append(node)
                child = node.children.get(segment)
                if child is not None:
                    step.append(child)
                star = node.children.get("*")
                if star is not None:
                    step.append(star)
            if not step:
                return set()
            current = self._closure(step)
        out: set[S] = set()
        for node in current:
            out |= node.here
        return out

    @staticmethod
    def _closure(nodes: list[_Node[S]]) -> list[_Node[S]]:
        """``nodes`` plus every node reachable from them through ``#`` edges (a ``#``
        matching zero segments), without duplicates."""
        seen: dict[int, _Node[S]] = {}
        stack = list(nodes)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            if node.hash is not None:
                stack.append(node.hash)
        return list(seen.values())

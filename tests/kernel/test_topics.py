"""Topic patterns and the subscription trie (kernel/topics.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from kernel.topics import TopicError, TopicTable, check_topic, split_pattern


def reference_match(pattern: str, topic: str) -> bool:
    """AMQP topic matching by regular expression, the obvious way: each pattern segment
    becomes ``\\.literal``, ``\\.[^.]+`` (``*``) or ``(?:\\.[^.]+)*`` (``#``), matched
    against the topic with a leading dot."""
    parts = []
    for segment in pattern.split("."):
        if segment == "*":
            parts.append(r"\.[^.]+")
        elif segment == "#":
            parts.append(r"(?:\.[^.]+)*")
        else:
            parts.append(r"\." + re.escape(segment))
    return re.fullmatch("".join(parts), "." + topic) is not None


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("papers.new", "papers.new", True),
        ("papers.new", "papers.old", False),
        ("papers.*", "papers.new", True),
        ("papers.*", "papers", False),
        ("papers.*", "papers.new.arxiv", False),
        ("papers.#", "papers", True),
        ("papers.#", "papers.new", True),
        ("papers.#", "papers.new.arxiv", True),
        ("papers.#", "paper", False),
        ("#", "anything.at.all", True),
        ("#", "x", True),
        ("*", "x", True),
        ("*", "x.y", False),
        ("#.new", "new", True),
        ("#.new", "a.b.new", True),
        ("#.new", "a.new.b", False),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("*.#.*", "a", False),
        ("*.#.*", "a.b", True),
        ("#.#", "a.b.c", True),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b", True),
        ("Papers.new", "papers.new", False),  # case-sensitive
    ],
)
def test_amqp_semantics(pattern, topic, matches):
    table: TopicTable[str] = TopicTable()
    table.subscribe(pattern, "s")
    assert (table.match(topic) == {"s"}) is matches
    assert reference_match(pattern, topic) is matches  # the reference agrees


def test_each_subscriber_once_however_many_patterns_match():
    table: TopicTable[str] = TopicTable()
    table.subscribe("papers.*", "r1")
    table.subscribe("papers.#", "r1")
    table.subscribe("#", "r1")
    table.subscribe("papers.new", "r2")
    assert table.match("papers.new") == {"r1", "r2"}
    assert table.match("papers.old") == {"r1"}
    assert len(table) == 4


def test_subscribe_is_idempotent_and_unsubscribe_removes_one():
    table: TopicTable[str] = TopicTable()
    assert table.subscribe("a.*", "s") is True
    assert table.subscribe("a.*", "s") is False
    table.subscribe("a.b", "s")
    assert table.patterns("s") == {"a.*", "a.b"}
    assert table.unsubscribe("a.*", "s") is True
    assert table.unsubscribe("a.*", "s") is False
    assert table.unsubscribe("never.seen", "s") is False
    assert table.match("a.b") == {"s"}
    assert table.match("a.c") == set()


def test_unsubscribe_all_and_pruning():
    table: TopicTable[int] = TopicTable()
    for i in range(10):
        table.subscribe(f"x.{i}.#", i)
        table.subscribe("x.*", i)
    assert table.unsubscribe_all(3) == 2
    assert table.unsubscribe_all(3) == 0
    assert table.match("x.3.y") == set()
    assert table.match("x.4.y") == {4}
    assert table.match("x.q") == set(range(10)) - {3}
    for i in range(10):
        table.unsubscribe_all(i)
    assert len(table) == 0
    assert table._root.empty()  # every node was pruned


@pytest.mark.parametrize(
    "bad", ["", "a..b", ".a", "a.", "a b", "pa*", "a.#b", "a\n", "x" * 256, "a.\u00a0"]
)
def test_malformed_patterns_raise_topic_error(bad):
    table: TopicTable[str] = TopicTable()
    with pytest.raises(TopicError):
        table.subscribe(bad, "s")


@pytest.mark.parametrize("bad", ["", "a..b", "a.*", "#", "a b", "a.#.b"])
def test_malformed_topics_raise_topic_error(bad):
    table: TopicTable[str] = TopicTable()
    with pytest.raises(TopicError):
        table.match(bad)
    with pytest.raises(TopicError):
        check_topic(bad)


def test_topic_error_is_a_value_error_and_segments_are_returned():
    assert issubclass(TopicError, ValueError)
    assert check_topic("a.b-c.d_e:f") == ("a", "b-c", "d_e:f")
    assert split_pattern("a.*.#") == ("a", "*", "#")
    with pytest.raises(TopicError, match="str"):
        check_topic(b"a.b")  # type: ignore[arg-type]


def test_many_patterns_match_fast():
    table: TopicTable[int] = TopicTable()
    for i in range(20_000):
        table.subscribe(f"tenant{i % 200}.agent{i}.*", i)
    table.subscribe("#.alert", -1)
    assert table.match("tenant7.agent207.news") == {207}
    assert table.match("tenant7.agent207.alert") == {207, -1}
    assert table.match("tenant7.nobody.alert") == {-1}


# ---- Against the regex reference ----

_LITERALS = ["a", "b", "c"]
_pattern_segment = st.sampled_from([*_LITERALS, "*", "#"])
_patterns = st.lists(_pattern_segment, min_size=1, max_size=5).map(".".join)
_topics = st.lists(st.sampled_from(_LITERALS), min_size=1, max_size=6).map(".".join)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(
    subs=st.lists(st.tuples(_patterns, st.integers(0, 7)), max_size=25),
    topics=st.lists(_topics, min_size=1, max_size=10),
)
def test_match_agrees_with_the_regex_reference(subs, topics):
    table: TopicTable[int] = TopicTable()
    for pattern, sub in subs:
        table.subscribe(pattern, sub)
    for topic in topics:
        expected = {sub for pattern, sub in subs if reference_match(pattern, topic)}
        assert table.match(topic) == expected, topic


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    subs=st.lists(st.tuples(_patterns, st.integers(0, 5)), max_size=20),
    drop=st.lists(st.tuples(_patterns, st.integers(0, 5)), max_size=20),
    topics=st.lists(_topics, min_size=1, max_size=8),
)
def test_unsubscribe_agrees_with_the_reference(subs, drop, topics):
    table: TopicTable[int] = TopicTable()
    live = set()
    for pattern, sub in subs:
        table.subscribe(pattern, sub)
        live.add((pattern, sub))
    for pattern, sub in drop:
        assert table.unsubscribe(pattern, sub) is ((pattern, sub) in live)
        live.discard((pattern, sub))
    assert len(table) == len(live)
    for topic in topics:
        expected = {sub for pattern, sub in live if reference_match(pattern, topic)}
        assert table.match(topic) == expected, topic

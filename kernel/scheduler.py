"""Work stealing between workers: message-based, with a responder thread in each victim.

Each worker owns a queue of ready tasks (a heap ordered by priority, then arrival: its
"deque"). Clients place a task on the less loaded of two workers, or on the worker that
holds its inputs (``submit(..., worker=)`` is the explicit form of that hint). When a worker
runs dry it steals from a busy one:

1. *Pick a victim.* After ``STEAL_DELAY_S`` with nothing in its own inbox (a client may be
   between two batches: stealing at once made busy workers trade tiny tasks back and
   forth), the thief reads the ``queued`` hints of the other workers' control rows, adds
   the unread depth of each busy worker's inbox ring, and picks the largest. If none shows
   work, it marks itself ``idle`` in its row, checks once more (so that a victim that
   published work just before cannot be missed for long), and blocks on its inbox ring: an
   idle worker costs nothing.
2. *Ask.* The thief writes ``steal_from`` and a new ``steal_seq`` into its *own* row (one
   writer each) and posts the victim's *steal bell*, a POSIX semaphore ``steal_wNN.<gen>``
   created by the supervisor beside the victim's inbox ring. The post orders the row writes
   before the victim's wait returns (NOTES.md: semaphores order memory).
3. *Give.* In the victim, a responder thread blocks on its bell (no CPU while nobody asks).
   Woken, it scans the rows for requests addressed to it with a sequence it has not served,
   and under the victim's queue lock: drains the victim's inbox ring into the queue (tasks
   that arrived while the main thread runs a long task count too), takes half of the
   queue (rounded up): every other task in the order the victim would run them, starting
   with the first (highest priority, then oldest; see ``split_for_thief``), forwards
   those ``RunTask`` frames to the thief's inbox ring, with the pickled function attached
   to the first task of each function, then sends ``StealReply(count)`` on the same lane,
   and finally tells each affected client ``TasksMoved`` so that a later death of the
   thief re-sends them. The thief reads the tasks, then the reply, and goes on.
4. *Hint.* A worker whose queue grows to two or more while another worker is idle sends
   it a ``Wake``; so does a client that sends to a worker with a queue while another has
   none of its tasks (or, for tasks pinned with ``worker=``, fewer by two). A woken worker
   tries a steal even if no hint shows work yet (``busy_too``). A task that reaches a busy
   worker's ring after a thief last looked, with no hint sent, waits for the victim's
   current task to end (the victim then reads it, and hints).

Why messages and not a shared deque with a lock: a lock word in shared memory held by a
process killed with SIGKILL stays held (NOTES.md); an OFD lock would be released, but every
pop would then cost a system call. Here no process ever waits on another one's lock: the
queue lock is a ``threading.Lock`` private to the victim, and a thread of the victim does
the giving. The responder runs whenever the victim's main thread releases the GIL (any
blocking call, or every ``sys.getswitchinterval()``, 5 ms, in pure Python code), so a victim
busy with a long task still gives within milliseconds. A task in C code that holds the GIL
delays the answer until it returns.

Crashes. A thief that dies before it reads the forwarded tasks: the victim already told the
clients ``TasksMoved``, so the thief's ``WorkerLost`` makes them re-send the tasks. A victim
that dies after forwarding and before ``TasksMoved``: the clients still think the tasks were
on the victim and re-send them, so they may run twice (at-least-once, as for any task a
worker death interrupts; the client keeps the first result). A request to a victim that
dies is never answered: the thief waits ``STEAL_WAIT_S`` and goes on.

Placement and memory. A ready task sits in its worker's heap as its ``RunTask`` (about 100
bytes plus its pickled arguments) plus a heap entry (a 3-tuple, 64 bytes). The client keeps
a ``_Task`` and a ``Future`` per submitted task; ``Client.run`` of a ``Graph`` keeps each
not-yet-submitted node in a compact record instead (see astra/_graph.py for its bytes per
pending node).
"""

from __future__ import annotations

__all__ = [
    "STEAL_DELAY_S",
    "STEAL_WAIT_S",
    "pick_victim",
    "split_for_thief",
    "steal_bell",
    "worker_ring",
]

import os
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

    from .control import ControlBlock

M = TypeVar("M")
#: A heap entry of a worker's queue: (-priority, arrival sequence, message).
Entry = tuple[int, int, M]

#: How long a worker that ran dry waits for its own work before it steals.
STEAL_DELAY_S: Final = float(os.getenv("ASTRA_STEAL_DELAY_S", "0.001"))
#: Longest a thief waits for a victim's ``StealReply`` before it gives up on that request.
STEAL_WAIT_S: Final = float(os.getenv("ASTRA_STEAL_WAIT_S", "0.05"))


def worker_ring(index: int, generation: int) -> str:
    """Name of the inbox ring of worker ``index``'s ``generation``-th process."""
    return f"to_w{index:02d}.{generation}"


def steal_bell(index: int, generation: int) -> str:
    """Name of the steal bell semaphore of worker ``index``'s ``generation``-th process."""
    return f"steal_w{index:02d}.{generation}"


def pick_victim(
    control: ControlBlock,
    me: int,
    *,
    busy_too: bool = False,
    backlog: Callable[[int], int] | None = None,
) -> int:
    """The other worker with the most work waiting, or -1 if none shows any: its published
    ``queued`` count plus, with ``backlog``, the slots unread in its inbox ring (tasks that
    arrived while it runs a long one). With ``busy_too``, a worker running a task with
    nothing visible waiting is a candidate as well (a hint said work is coming)."""
    best, best_n = -1, 0
    for index in range(control.workers):
        if index == me:
            continue
        n = control.queued(index)
        if backlog is not None and control.busy(index):
            n += backlog(index)
        if n > best_n:
            best, best_n = index, n
    if best < 0 and busy_too:
        for index in range(control.workers):
            if index != me and control.busy(index):
                return index
    return best


def split_for_thief(heap: list[Entry[M]]) -> list[Entry[M]]:
    """Remove and return half of ``heap`` (rounded up) for a thief: every other task in run
    order, starting with the first (so the thief takes the highest-priority, oldest task
    first). ``heap`` keeps the rest and stays a valid heap.

    Why every other one rather than the first half: each half is then a fair sample of the
    queue. On the issue's imbalanced workload (8 tasks of 200 ms and 56 of 10 ms queued on
    one worker, long ones first) a simulation of two workers gives a makespan of 1.058 x
    ideal when the thief takes the first half and 1.001 x with this split; with the long
    tasks interleaved among the short ones, 1.001 x and 1.041 x."""
    if not heap:
        return []
    ordered = sorted(heap)
    heap[:] = ordered[1::2]  # a sorted list is a valid heap
    return ordered[0::2]

"""Which assignments a worker has already taken on, so none runs twice.

The same assignment can reach a worker more than once: the stream replays around a
reconnect, the poll on every (re)connect returns tasks the stream also delivered, and a
lagging read model can list a task as still ``assigned`` after the worker finished it.
An attempt number only grows for a task (it is counted at each assignment), so an offer
is new exactly when its attempt is higher than every attempt of that task already seen.
"""

from __future__ import annotations

from collections import OrderedDict


class AssignmentTracker:
    """Remembers the highest attempt claimed per task and which attempts are in flight.

    ``capacity`` bounds how many finished tasks are remembered (least recently seen are
    forgotten first; in-flight ones never are). An unknown attempt (None) is treated
    conservatively: it matches any attempt of the same task.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._seen: OrderedDict[str, int | None] = OrderedDict()
        self._active: set[tuple[str, int | None]] = set()

    def claim(self, task_id: str, attempt: int | None) -> bool:
        """Take on attempt ``attempt`` of ``task_id``: True if it is new, False if a repeat.

        A claimed attempt is in flight until :meth:`release`.
        """
        if task_id in self._seen:
            previous = self._seen[task_id]
            if attempt is None or previous is None or attempt <= previous:
                self._seen.move_to_end(task_id)
                return False
        self._seen[task_id] = attempt
        self._seen.move_to_end(task_id)
        self._active.add((task_id, attempt))
        self._evict()
        return True

    def take_back(self, task_id: str, attempt: int | None) -> bool:
        """Decide, now, whether this process may hand back attempt ``attempt`` of ``task_id``
        (the server says this agent runs it): True, and the attempt is marked in flight
        until :meth:`release`, when no attempt of the task is in flight here and no later
        attempt was seen; False when it is running here (keep it) or the server's view
        is older than ours.

        Race-free with :meth:`claim` as long as both are called from one event loop: the
        start path claims an attempt before it sends its start, so an attempt being
        started is in flight and is never taken back, and an attempt taken back is seen,
        so an offer of it that arrives meanwhile is a repeat and is not started.
        """
        if self.is_active(task_id):
            return False
        previous = self._seen.get(task_id)
        if attempt is not None and previous is not None and previous > attempt:
            return False
        newer = attempt is not None and (previous is None or previous < attempt)
        if newer or task_id not in self._seen:
            self._seen[task_id] = attempt
        self._seen.move_to_end(task_id)
        self._active.add((task_id, attempt))
        self._evict()
        return True

    def release(self, task_id: str, attempt: int | None) -> None:
        """The attempt is over (done, failed or dropped); it stays remembered as seen."""
        self._active.discard((task_id, attempt))
        self._evict()

    def is_active(self, task_id: str) -> bool:
        """True when some attempt of ``task_id`` is in flight here."""
        return any(t == task_id for t, _ in self._active)

    def seen(self, task_id: str) -> bool:
        """True when some attempt of ``task_id`` was claimed (and is not yet forgotten)."""
        return task_id in self._seen

    @property
    def active(self) -> frozenset[tuple[str, int | None]]:
        """The (task id, attempt) pairs in flight."""
        return frozenset(self._active)

    def __len__(self) -> int:
        return len(self._active)

    def _evict(self) -> None:
        if len(self._seen) <= self._capacity:
            return
        busy = {t for t, _ in self._active}
        for task_id in list(self._seen):
            if len(self._seen) <= self._capacity:
                break
            if task_id not in busy:
                del self._seen[task_id]

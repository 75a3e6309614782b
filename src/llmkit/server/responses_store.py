"""The responses a server keeps for ``GET``/``DELETE /v1/responses/{id}`` and ``previous_response_id``:
in memory, the most recently used ``capacity`` of them, the least recently used leaving first.

Each entry holds the response object as it was answered and the conversation it closes (the earlier
turns, this request's input, its output), so that a follow-up needs only the one response it names:
a chain stays usable after its older links were evicted. Histories share their items with the
entries they grew from (lists of the same dicts), so a long chain costs pointers, not copies.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Stored:
    response: dict  # the Response object, as answered
    history: list[dict]  # input items of every turn up to this one, then this response's output items


class ResponseStore:
    """A bounded map from response id to ``Stored``; used from the event loop only."""

    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, history: list[dict]) -> None:
        if self.capacity == 0:
            return
        self._entries[response["id"]] = Stored(response, history)
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None

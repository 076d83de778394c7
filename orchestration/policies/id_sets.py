"""Sets of node ids the candidate index draws from: addressable by position, so a uniform random
pick is O(1), and cheap to keep current as nodes come, go and change."""

from __future__ import annotations

from collections.abc import Iterator


class Bag:
    """Node ids with O(1) add, discard and access by position."""

    __slots__ = ("ids", "pos")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, node_id: str) -> None:
        self.pos[node_id] = len(self.ids)
        self.ids.append(node_id)

    def discard(self, node_id: str) -> None:
        i = self.pos.pop(node_id, None)
        if i is None:
            return
        last = self.ids.pop()
        if last != node_id:
            self.ids[i] = last
            self.pos[last] = i


class Suffix:
    """The ids in ``entries[start:]`` of a sorted ``(amount, node_id)`` list, without copying."""

    __slots__ = ("entries", "start")

    def __init__(self, entries: list[tuple[int, str]], start: int) -> None:
        self.entries, self.start = entries, start

    def at(self, i: int) -> str:
        return self.entries[self.start + i][1]

    def __iter__(self) -> Iterator[str]:
        for i in range(self.start, len(self.entries)):
            yield self.entries[i][1]


class Union:
    """The ids of several bags, addressable by position."""

    __slots__ = ("bags",)

    def __init__(self, bags: list[Bag]) -> None:
        self.bags = bags

    def at(self, i: int) -> str:
        for bag in self.bags:
            if i < len(bag):
                return bag.ids[i]
            i -= len(bag)
        raise IndexError(i)

    def __iter__(self) -> Iterator[str]:
        for bag in self.bags:
            yield from bag.ids

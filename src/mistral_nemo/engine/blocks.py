"""The pool of KV-cache blocks: allocation, reference counts and the prefix cache.

A block holds the keys and values of `block_size` consecutive tokens of one sequence. A
full block is known by a hash of its tokens and of all tokens before it, so two requests
that share a prefix (a system prompt) can share its blocks. A block nobody uses any more
keeps its contents and its hash until it is handed out again, oldest first, so a later
request with the same prefix still finds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockPool:
    def __init__(self, num_blocks: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self.hits = 0  # blocks found in the prefix cache

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """An unused block (the least recently freed), with its old cache entry dropped."""
        block, _ = self._free.popitem(last=False)
        old = self._hash_of.pop(block, None)
        if old is not None:
            del self._by_hash[old]
        self._refs[block] = 1
        return block

    def lookup(self, h: int) -> int | None:
        """A cached block with hash `h`, now also referenced by the caller, or None."""
        block = self._by_hash.get(h) if self.prefix_caching else None
        if block is None:
            return None
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1
        self.hits += 1
        return block

    def register(self, block: int, h: int) -> None:
        """Record that `block` is full and holds the tokens hashed to `h`."""
        if self.prefix_caching and h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

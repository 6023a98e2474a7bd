"""In-memory LRU of encoded support sets, bounded by entry count and by bytes.

An entry holds the support encoder's outputs for one registered support set; a query against
it runs only the query decoder. Evicted sets must be registered again (the id then 404s).
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SupportSet:
    family: str
    shots: int
    features: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.features.values())


class SupportCache:
    def __init__(self, max_entries: int = 256, max_bytes: int = 1 << 30):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("support cache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, SupportSet] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, support: SupportSet) -> str:
        """Store ``support`` under a new random id (evicting least recently used sets)."""
        if support.nbytes > self.max_bytes:
            raise ValueError(f"support set of {support.nbytes} bytes exceeds the cache's {self.max_bytes} bytes")
        support_id = secrets.token_hex(16)
        with self._lock:
            self._entries[support_id] = support
            self._bytes += support.nbytes
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
        return support_id

    def get(self, support_id: str) -> SupportSet | None:
        with self._lock:
            support = self._entries.get(support_id)
            if support is not None:
                self._entries.move_to_end(support_id)
            return support

    def remove(self, support_id: str) -> bool:
        with self._lock:
            support = self._entries.pop(support_id, None)
            if support is not None:
                self._bytes -= support.nbytes
            return support is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

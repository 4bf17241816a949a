"""Bounded least-recently-used maps: decrypted values by token, tenants by row.

`DecryptedCache` is keyed by the stored token itself: a changed secret is
stored as a new token (Fernet draws a fresh IV and timestamp each time), so a
cached entry can never serve a stale value. `RowMemo` maps a key to the row
it was built from and the frozen object built from it; a hit needs the row
read now to equal the one remembered, value for value, so it can never serve
a stale object either. Both hold plaintext in process memory, which the
threat model already trusts; `size=0` turns them off.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["DecryptedCache", "RowMemo"]

K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    __slots__ = ("_data", "size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("cache_size is expected to be zero or greater")
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def _get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def _put(self, key: K, value: V) -> None:
        if not self.size:
            return
        data = self._data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.size:
            data.popitem(last=False)

    def discard(self, key: K) -> None:
        """Forget one entry, if present."""
        self._data.pop(key, None)

    def clear(self) -> None:
        """Forget every entry."""
        self._data.clear()


class DecryptedCache(_LRU[str, tuple[str, str]]):
    """At most `size` token -> (plaintext, key id) entries, evicting the least recently used."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<DecryptedCache {len(self._data)}/{self.size}>"

    def get(self, token: str) -> tuple[str, str] | None:
        """Return (plaintext, key id) for `token`, or None; a hit becomes most recent."""
        return self._get(token)

    def put(self, token: str, plaintext: str, key_id: str) -> None:
        """Remember `plaintext` (made under `key_id`) for `token`; the oldest goes when full."""
        self._put(token, (plaintext, key_id))


class RowMemo(_LRU[object, tuple[object, V]], Generic[V]):
    """At most `size` key -> (row, object built from it) entries, least recently used out."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<RowMemo {len(self._data)}/{self.size}>"

    def get(self, key: object, row: object) -> V | None:
        """The object built from `row` for `key`, if the remembered row equals `row`."""
        entry = self._get(key)
        if entry is None or entry[0] != row:
            return None
        return entry[1]

    def put(self, key: object, row: object, value: V) -> None:
        """Remember `value` as built from `row`."""
        self._put(key, (row, value))

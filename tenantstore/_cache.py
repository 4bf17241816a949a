"""A bounded least-recently-used map from ciphertext to plaintext.

Keyed by the token itself: a changed secret is stored as a new token (Fernet
draws a fresh IV and timestamp each time), so a cached entry can never serve
a stale value. It holds plaintext in process memory, which the threat model
already trusts; `size=0` turns it off.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["DecryptedCache"]


class DecryptedCache:
    """At most `size` token -> plaintext entries, evicting the least recently used."""

    __slots__ = ("_data", "size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("cache_size is expected to be zero or greater")
        self.size = size
        self._data: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<DecryptedCache {len(self._data)}/{self.size}>"

    def get(self, token: str) -> str | None:
        """Return the plaintext for `token`, or None; a hit becomes most recent."""
        value = self._data.get(token)
        if value is not None:
            self._data.move_to_end(token)
        return value

    def put(self, token: str, plaintext: str) -> None:
        """Remember `plaintext` for `token`, evicting the oldest entry when full."""
        if not self.size:
            return
        data = self._data
        data[token] = plaintext
        data.move_to_end(token)
        if len(data) > self.size:
            data.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._data.clear()

"""Bounded, thread-safe caches of open handles, and a registry to release them.

Dask workers live for many slides; every per-process cache of open files
(slide readers, output arrays) is a :class:`BoundedCache` so that it holds at
most ``maxsize`` entries and closes whatever leaves it. Caches registered with
:func:`register` can be emptied together (:func:`release_all`) or for one
path (:func:`release`), e.g. after a slide or an output is rewritten.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def close_value(value: Any) -> None:
    """Default ``on_evict``: call ``value.close()`` when it has one."""
    close = getattr(value, "close", None)
    if callable(close):
        close()


class BoundedCache(Generic[K, V]):
    """A least-recently-used mapping that calls ``on_evict`` on every value leaving it.

    Parameters
    ----------
    maxsize : int
        Most entries kept; the least recently used one leaves first.
    on_evict : callable, optional
        Called (outside the lock) with each value that is evicted, discarded,
        cleared or replaced. Default: :func:`close_value`.
    """

    def __init__(self, maxsize: int, on_evict: Callable[[V], None] = close_value) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self.on_evict = on_evict
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._creating: dict[K, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._data)

    def _hit(self, key: K) -> tuple[bool, V | None]:
        """``(True, value)`` and mark it recently used, or ``(False, None)``; caller holds the lock."""
        if key in self._data:
            self._data.move_to_end(key)
            return True, self._data[key]
        return False, None

    def get_or_create(self, key: K, factory: Callable[[], V]) -> V:
        """The cached value of ``key``, made by ``factory()`` once (outside the cache lock)."""
        with self._lock:
            found, value = self._hit(key)
            if found:
                return value  # type: ignore[return-value]
            creating = self._creating.setdefault(key, threading.Lock())
        with creating:  # one factory call per key, however many threads ask
            with self._lock:
                found, value = self._hit(key)
                if found:
                    return value  # type: ignore[return-value]
            try:
                value = factory()
            except BaseException:
                with self._lock:
                    self._creating.pop(key, None)
                raise
            with self._lock:
                left = [self._data.pop(key)] if key in self._data else []
                self._data[key] = value
                while len(self._data) > self.maxsize:
                    left.append(self._data.popitem(last=False)[1])
                self._creating.pop(key, None)
        self._evict(left)
        return value

    def pop(self, key: K) -> V | None:
        """Remove ``key`` and return its value (not passed to ``on_evict``), or None."""
        with self._lock:
            return self._data.pop(key, None)

    def discard(self, predicate: Callable[[K], bool]) -> int:
        """Remove (and ``on_evict``) every entry whose key matches; return how many."""
        with self._lock:
            keys = [key for key in self._data if predicate(key)]
            left = [self._data.pop(key) for key in keys]
        self._evict(left)
        return len(left)

    def clear(self) -> int:
        """Remove (and ``on_evict``) every entry; return how many."""
        return self.discard(lambda key: True)

    def _evict(self, values: list[V]) -> None:
        for value in values:
            self.on_evict(value)


_REGISTRY: dict[str, tuple[BoundedCache[Any, Any], Callable[[Any], str]]] = {}


def register(name: str, cache: BoundedCache[K, V], path_of: Callable[[K], str]) -> BoundedCache[K, V]:
    """Add ``cache`` to the registry under ``name`` (replacing an earlier one); return it.

    ``path_of(key)`` is the file or folder an entry holds open, for :func:`release`.
    """
    _REGISTRY[name] = (cache, path_of)
    return cache


def release_all() -> int:
    """Clear every registered cache; return how many entries were closed."""
    return sum(cache.clear() for cache, _ in list(_REGISTRY.values()))


def release(path_prefix: str | os.PathLike[str]) -> int:
    """Drop from every registered cache the entries at or under ``path_prefix``; return how many."""
    root = os.path.abspath(path_prefix)
    under = root.rstrip(os.sep) + os.sep

    def matches(path_of: Callable[[Any], str], key: Any) -> bool:
        path = os.path.abspath(path_of(key))
        return path == root or path.startswith(under)

    return sum(
        cache.discard(lambda key, p=path_of: matches(p, key)) for cache, path_of in list(_REGISTRY.values())
    )

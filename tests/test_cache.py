"""Bounded caches: LRU eviction closes handles, and long runs keep file descriptors flat."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import zarr

from conftest import structured_image, write_pyramid
from wsiseg import cache, output, readers, slide
from wsiseg.cache import BoundedCache
from wsiseg.tiling import Box


class Handle:
    """Counts its ``close`` calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _empty_caches():
    readers.clear_readers()
    yield
    cache.release_all()


# --------------------------------------------------------------------------- BoundedCache


def test_least_recently_used_entry_is_evicted_and_closed() -> None:
    lru: BoundedCache[str, Handle] = BoundedCache(2)
    a = lru.get_or_create("a", lambda: Handle("a"))
    b = lru.get_or_create("b", lambda: Handle("b"))
    assert lru.get_or_create("a", lambda: Handle("a2")) is a  # a is now the most recent
    c = lru.get_or_create("c", lambda: Handle("c"))
    assert len(lru) == 2
    assert (a.closed, b.closed, c.closed) == (0, 1, 0)
    assert lru.get_or_create("b", lambda: Handle("b2")).name == "b2"  # b was made again
    assert a.closed == 1  # and a, least recent now, left


def test_discard_and_clear_close_values_and_pop_hands_over() -> None:
    lru: BoundedCache[tuple[str, int], Handle] = BoundedCache(10)
    handles = {key: lru.get_or_create(key, lambda key=key: Handle(str(key))) for key in [("x", 1), ("x", 2), ("y", 1)]}
    assert lru.discard(lambda key: key[0] == "x") == 2
    assert [handles[("x", 1)].closed, handles[("x", 2)].closed, handles[("y", 1)].closed] == [1, 1, 0]
    popped = lru.pop(("y", 1))
    assert popped is handles[("y", 1)] and popped.closed == 0 and len(lru) == 0
    z = lru.get_or_create(("z", 1), lambda: Handle("z"))
    assert lru.clear() == 1 and z.closed == 1 and len(lru) == 0


def test_custom_on_evict_and_failed_factory() -> None:
    left: list[str] = []
    lru: BoundedCache[str, str] = BoundedCache(1, on_evict=left.append)
    lru.get_or_create("a", lambda: "A")
    lru.get_or_create("b", lambda: "B")
    assert left == ["A"]

    def fail() -> str:
        raise OSError("cannot open")

    with pytest.raises(OSError):
        lru.get_or_create("c", fail)
    assert lru.get_or_create("c", lambda: "C") == "C"  # a failure does not stick
    assert left == ["A", "B"]


def test_threads_racing_on_one_key_create_it_once() -> None:
    lru: BoundedCache[str, Handle] = BoundedCache(4)
    calls: list[int] = []
    start = threading.Barrier(8)
    results: list[Handle] = []

    def factory() -> Handle:
        calls.append(1)
        time.sleep(0.05)
        return Handle("shared")

    def worker() -> None:
        start.wait()
        results.append(lru.get_or_create("key", factory))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 8
    assert all(result is results[0] for result in results) and results[0].closed == 0


def test_release_drops_entries_at_or_under_a_path(tmp_path) -> None:
    lru: BoundedCache[tuple[str, str], Handle] = BoundedCache(10)
    cache.register("test-release", lru, path_of=lambda key: key[0])
    try:
        inside = lru.get_or_create((str(tmp_path / "a" / "b.zarr"), "x"), lambda: Handle("inside"))
        exact = lru.get_or_create((str(tmp_path / "a"), "y"), lambda: Handle("exact"))
        sibling = lru.get_or_create((str(tmp_path / "ab"), "z"), lambda: Handle("sibling"))
        assert cache.release(str(tmp_path / "a")) == 2
        assert (inside.closed, exact.closed, sibling.closed) == (1, 1, 0)
        assert cache.release_all() >= 1 and sibling.closed == 1
    finally:
        cache._REGISTRY.pop("test-release", None)


# --------------------------------------------------------------------------- slide readers


def _write_slide(path, seed: int) -> np.ndarray:
    image = structured_image(np.random.default_rng(seed), 128, 160)
    write_pyramid(path, image, tile=64, factors=(1, 2))
    return image


def test_reading_many_slides_keeps_descriptors_and_readers_bounded(tmp_path) -> None:
    counts = {}
    for i in range(1, 51):
        path = tmp_path / f"slide{i}.tif"
        image = _write_slide(path, i)
        region = slide.open_slide(path).read_region(0, Box(0, 8, 0, 8))
        np.testing.assert_array_equal(region, image[:8, :8])
        counts[i] = open_fds()
    assert counts[50] - counts[10] <= 2, counts
    assert len(readers.READERS) <= readers.READERS_MAXSIZE


def test_rewritten_slide_reads_new_pixels_and_closes_its_old_reader(tmp_path) -> None:
    path = tmp_path / "slide.tif"
    first = _write_slide(path, 1)
    opened = slide.open_slide(path)
    np.testing.assert_array_equal(opened.read_region(0, Box(0, 8, 0, 8)), first[:8, :8])
    old = readers.get_reader(opened.backend, opened.path)
    before = open_fds()

    second = _write_slide(path, 2)  # same path, same inode, new content
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(opened.read_region(0, Box(0, 8, 0, 8)), second[:8, :8])

    assert readers.get_reader(opened.backend, opened.path) is not old
    assert old._retired and old._tiff.filehandle.closed
    assert open_fds() <= before
    assert len([key for key in readers.READERS._data if key[1] == str(path)]) == 1


def test_release_closes_that_slides_reader(tmp_path) -> None:
    path, other = tmp_path / "slide.tif", tmp_path / "other.tif"
    _write_slide(path, 1)
    _write_slide(other, 2)
    slides = [slide.open_slide(p) for p in (path, other)]
    for s in slides:
        s.read_region(0, Box(0, 8, 0, 8))
    reader = readers.get_reader(slides[0].backend, slides[0].path)
    kept = readers.get_reader(slides[1].backend, slides[1].path)
    before = open_fds()
    assert cache.release(str(path)) == 1
    assert reader._retired and reader._tiff.filehandle.closed
    assert open_fds() == before - 2  # tifffile's handle and the raw-tile descriptor
    assert [key[1] for key in readers.READERS._data] == [str(other)]
    assert readers.get_reader(slides[1].backend, slides[1].path) is kept and not kept._retired


def test_reader_retired_during_a_read_closes_when_the_read_ends(tmp_path) -> None:
    path = tmp_path / "slide.tif"
    image = _write_slide(path, 3)
    opened = slide.open_slide(path)
    reader = readers.lease_reader(opened.backend, opened.path)
    readers.clear_readers()  # another thread empties the cache mid-read
    assert not reader._tiff.filehandle.closed
    np.testing.assert_array_equal(reader.read(0, Box(0, 8, 0, 8))[..., :3], image[:8, :8])
    reader.unlease()
    assert reader._tiff.filehandle.closed
    assert not reader.lease()  # a retired reader is never read again
    np.testing.assert_array_equal(opened.read_region(0, Box(0, 8, 0, 8)), image[:8, :8])


# --------------------------------------------------------------------------- output arrays


def test_open_array_cache_stays_bounded(tmp_path) -> None:
    outs = []
    for i in range(100):
        out = tmp_path / f"out{i}.zarr"
        zarr.open_array(str(out / "mask"), mode="w", shape=(4, 4), chunks=(4, 4), dtype="u1", zarr_format=2)
        array = output.open_array(out, "mask")
        array[0, 0] = i
        assert output.open_array(out, "mask") is array
        outs.append(out)
    assert len(output._ARRAYS) <= output.ARRAYS_MAXSIZE
    assert int(output.open_array(outs[0], "mask")[0, 0]) == 0  # evicted, opened again
    output.forget_arrays(outs[0])
    assert not any(key[0] == str(outs[0]) for key in output._ARRAYS._data)
    assert cache.release(str(outs[-1])) == 1

"""A pool of system shared-memory regions for Triton requests, owned by one TritonBackend.

Registering a region with a server is a round trip, so regions are created once, registered once
per server, and reused: a request checks out one region per large tensor and returns it when the
response has been read. Sizes are rounded up to a power of two so a region fits the next request
of a similar size. Only for servers on this host (the server maps the same memory).
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field

import numpy as np

MIN_REGION_BYTES = 1 << 16


@dataclass(eq=False)
class Region:
    name: str  # Triton's name for the region
    key: str  # the POSIX shared-memory key both processes open
    byte_size: int
    handle: object
    registered_on: set = field(default_factory=set)  # server URLs that know this region


class SharedMemoryPool:
    """Thread-safe: many request threads check regions out concurrently."""

    def __init__(self, prefix: str | None = None):
        from tritonclient.utils import shared_memory

        self._shm = shared_memory
        self._prefix = prefix or f"posterrt_{os.getpid()}_{id(self):x}"
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._all: list[Region] = []

    def acquire(self, nbytes: int) -> Region:
        """A free region of at least ``nbytes`` (the smallest that fits), created if none is free."""
        with self._lock:
            fitting = [r for r in self._free if r.byte_size >= nbytes]
            if fitting:
                region = min(fitting, key=lambda r: r.byte_size)
                self._free.remove(region)
                return region
            size = max(MIN_REGION_BYTES, 1 << max(0, nbytes - 1).bit_length())
            name = f"{self._prefix}_{next(self._counter)}"
            key = "/" + name
            handle = self._shm.create_shared_memory_region(name, key, size, create_only=True)
            region = Region(name, key, size, handle)
            self._all.append(region)
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            self._free.append(region)

    def write(self, region: Region, array: np.ndarray) -> None:
        self._shm.set_shared_memory_region(region.handle, [np.ascontiguousarray(array)])

    def read(self, region: Region, dtype, shape) -> np.ndarray:
        # a copy: the region goes back to the pool and the next request overwrites it
        return np.array(self._shm.get_contents_as_numpy(region.handle, np.dtype(dtype), list(shape)), copy=True)

    def ensure_registered(self, region: Region, server: str, client) -> None:
        """Register ``region`` with ``server`` through ``client`` the first time it is used there."""
        if server in region.registered_on:
            return
        client.register_system_shared_memory(region.name, region.key, region.byte_size)
        region.registered_on.add(server)

    def forget_server(self, server: str) -> None:
        """A server that went away lost its registrations; register again when it is back."""
        with self._lock:
            for region in self._all:
                region.registered_on.discard(server)

    def regions_on(self, server: str) -> list[Region]:
        with self._lock:
            return [r for r in self._all if server in r.registered_on]

    def close(self) -> None:
        """Destroy every region (the caller unregisters them from live servers first)."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        for region in regions:
            try:
                self._shm.destroy_shared_memory_region(region.handle)
            except Exception:  # already gone: nothing left to free
                pass

"""Guest memory the simulator really holds (``--sim-touch-memory``).

A real Cloud Hypervisor maps the guest's RAM into its own process, and the pages the guest
touches count against the VM pod's cgroup. The model (``sim.cloudhypervisor``) only
counts bytes, so on a real node the cgroup saw the simulator's own few MiB, and a pod
shrunk under its guest's memory went unpunished. With the ballast, the simulator process
holds (anonymous, private, every page written once) exactly the memory the model says the
guest holds: its boot memory plus what virtio-mem has plugged and the guest has not given
back. The kernel's OOM killer then judges chscale as it would judge a real VMM.

Chunks of a fixed size keep a shrink cheap: whole chunks are unmapped, and only the last
one is remapped at its new size.
"""

from __future__ import annotations

import mmap

CHUNK = 64 << 20
PAGE = mmap.PAGESIZE


class Ballast:
    def __init__(self) -> None:
        self._chunks: list[mmap.mmap] = []
        self.size = 0

    def resize(self, size: int) -> None:
        """Hold exactly ``size`` bytes (rounded up to a page), touched."""
        size = -(-max(size, 0) // PAGE) * PAGE
        if size == self.size:
            return
        while self._chunks and self.size - len(self._chunks[-1]) >= size:
            self.size -= len(self._chunks[-1])
            self._chunks.pop().close()
        if self._chunks and self.size > size:
            # Shrink the last chunk: a fresh, smaller mapping (its old pages go back).
            last = self._chunks.pop()
            self.size -= len(last)
            last.close()
        while self.size < size:
            if self._chunks and len(self._chunks[-1]) < CHUNK:
                # Grow the last, partial chunk by replacing it with a larger one.
                last = self._chunks.pop()
                self.size -= len(last)
                last.close()
            length = min(CHUNK, size - self.size)
            self._chunks.append(_touched(length))
            self.size += length

    def close(self) -> None:
        self.resize(0)


def _touched(length: int) -> mmap.mmap:
    area = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # One byte per page makes every page resident: a zero-filled mapping costs nothing
    # until written, and the cgroup must see what the guest holds.
    area[::PAGE] = b"\x01" * (length // PAGE)
    return area

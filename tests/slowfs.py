"""A slow file server, made by the kernel: fanotify permission events on a folder hold each
open of a file that holds `marker` for `seconds` before the kernel lets it go on, as an NFS
server that takes seconds to answer would (the opening thread waits in the open() call).
Opens of other files are let go at once. Needs CAP_SYS_ADMIN (the tests run as root) and a
kernel with fanotify permission events (Debian's has them).

Closing the fanotify descriptor lets every held open go on, so a test that ends early never
leaves pickupd hanging."""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from pathlib import Path
from types import TracebackType

_FAN_CLASS_CONTENT = 0x04
_FAN_CLOEXEC = 0x01
_FAN_MARK_ADD = 0x01
_FAN_OPEN_PERM = 0x0001_0000
_FAN_EVENT_ON_CHILD = 0x0800_0000
_FAN_ALLOW = 0x01
_AT_FDCWD = -100
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
_EVENT = struct.Struct("=IBBHQii")
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response: fd, response


class SlowOpens:
    """While entered, each first open of a file in `folder` whose content holds `marker`
    takes `seconds`; `held` counts the opens it held."""

    def __init__(self, folder: Path, marker: bytes, seconds: float) -> None:
        self.folder, self.marker, self.seconds = folder, marker, seconds
        self.held = 0
        self._seen: set[int] = set()  # inodes already held once
        self._lock = threading.Lock()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p
        ]  # fmt: skip
        fd = libc.fanotify_init(_FAN_CLASS_CONTENT | _FAN_CLOEXEC, os.O_RDONLY)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init (root and fanotify needed)")
        mask = _FAN_OPEN_PERM | _FAN_EVENT_ON_CHILD
        if libc.fanotify_mark(fd, _FAN_MARK_ADD, mask, _AT_FDCWD, os.fsencode(folder)) < 0:
            error = ctypes.get_errno()
            os.close(fd)
            raise OSError(error, "fanotify_mark", str(folder))
        self._fd = fd
        self._reader = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> SlowOpens:
        self._reader.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self._fd)  # the kernel lets every held open go on
        self._reader.join(timeout=5)

    def _read(self) -> None:
        while True:
            try:
                buffer = os.read(self._fd, 4096)
            except OSError:
                return  # closed
            offset = 0
            while offset + _EVENT.size <= len(buffer):
                length, _, _, _, _, fd, _ = _EVENT.unpack_from(buffer, offset)
                offset += length
                if fd >= 0:
                    self._answer(fd)

    def _answer(self, fd: int) -> None:
        """Let the open go on now, or after `seconds` (in a timer: other opens are answered
        meanwhile, as a server answers its other clients)."""
        try:
            inode = os.fstat(fd).st_ino
            slow = self.marker in os.pread(fd, 1 << 20, 0)
        except OSError:  # a directory: not held
            inode, slow = 0, False
        with self._lock:
            slow = slow and inode not in self._seen
            if slow:
                self._seen.add(inode)
                self.held += 1
        if slow:
            threading.Timer(self.seconds, self._allow, (fd,)).start()
        else:
            self._allow(fd)

    def _allow(self, fd: int) -> None:
        try:
            os.write(self._fd, _RESPONSE.pack(fd, _FAN_ALLOW))
        except OSError:
            pass  # closed meanwhile: the kernel let it go on
        finally:
            os.close(fd)

"""The one exception the engine raises for a call KVM would reject."""

from __future__ import annotations

import errno as _errno


class KvmError(Exception):
    """A rejected call: `errno` is what the ioctl would set, `detail` says which rule."""

    def __init__(self, errno: int, detail: str) -> None:
        super().__init__(f"{_errno.errorcode.get(errno, str(errno))}: {detail}")
        self.errno = errno
        self.detail = detail

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


def einval(detail: str) -> KvmError:
    return KvmError(_errno.EINVAL, detail)

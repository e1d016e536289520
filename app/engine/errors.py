"""The one exception the engine raises for a call KVM would reject."""

from __future__ import annotations

import errno as _errno


class KvmError(Exception):
    """A rejected call: `errno` is what the ioctl would set, `detail` says which rule."""

    def __init__(self, errno: int, detail: str) -> None:
        self.errno = errno
        self.detail = detail
        self.state_changed = False  # a rejection that still changed state, as the kernel does
        super().__init__(f"{self.errno_name}: {detail}")

    @property
    def errno_name(self) -> str:
        # Python names 95 ENOTSUP; the kernel's uapi and KVM's documentation say EOPNOTSUPP.
        if self.errno == _errno.EOPNOTSUPP:
            return "EOPNOTSUPP"
        return _errno.errorcode.get(self.errno, str(self.errno))


def einval(detail: str) -> KvmError:
    return KvmError(_errno.EINVAL, detail)


def check_u64(value: object, name: str) -> int:
    """An argument that must fit a __u64 field (JSON can say anything)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= (1 << 64) - 1:
        raise einval(f"{name} must be an integer in [0, 2**64): {value!r}")
    return value


MAX_DATA_BYTES = 1 << 20  # bytes one host/guest_memfd read or write may carry


def hex_bytes(value: object, name: str = "data") -> bytes:
    """Bytes given as a hex string (an optional 0x prefix)."""
    if not isinstance(value, str):
        raise einval(f"{name} must be a hex string")
    s = value[2:] if value.startswith(("0x", "0X")) else value
    try:
        return bytes.fromhex(s)
    except ValueError:
        raise einval(f"{name} is not valid hex") from None

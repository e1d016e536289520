"""A tiny deterministic stand-in for the engine, for failure-injection tests.

Same entry points as the real one (`Vm.create`, `vm.apply`, `vm.info`, codec dumps/loads
with a checksum), a handful of ops, and one op that fails *after* changing state, so the
service's handling of `state_changed` errors can be tested whatever the engine does today.
"""

from __future__ import annotations

import errno
import hashlib
import json
import struct
import threading
import time
import zlib
from typing import Any

from app.engine.errors import KvmError
from app.services.engine_port import EnginePort

MAGIC = b"FAKEVM\x00\x01"

# Named gates for the `gate` op: it sets `<name>.entered`, then blocks until `<name>` is set,
# so a test can hold one VM's call inside the engine for as long as it likes.
GATES: dict[str, threading.Event] = {}


def gate(name: str) -> tuple[threading.Event, threading.Event]:
    """(entered, release) events of the gate `name`, created fresh."""
    GATES[name + ".entered"] = entered = threading.Event()
    GATES[name] = release = threading.Event()
    return entered, release


class FakeCorrupt(Exception):
    pass


class FakeVm:
    def __init__(self, vm_type: int, vcpus: int, paging_levels: int, name: str | None) -> None:
        self.state: dict[str, Any] = {
            "vm_type": vm_type,
            "paging_levels": paging_levels,
            "name": name,
            "vcpus": list(range(vcpus)),
            "disabled_quirks": 0,
            "memslots": {},
            "host": {},
            "counter": 0,
        }

    @classmethod
    def create(
        cls,
        vm_type: int = 0,
        vcpus: int = 1,
        paging_levels: int = 4,
        name: str | None = None,
        engine_rev: int = 2,  # the service journals it; the fake has one behaviour
    ) -> FakeVm:
        if vm_type not in (0, 1, 5) or paging_levels not in (4, 5):
            raise KvmError(errno.EINVAL, "unsupported")
        return cls(vm_type, vcpus, paging_levels, name)

    last_durations: list[int] = []  # the fake measures nothing

    def apply(
        self,
        op: str,
        args: dict[str, Any],
        at: float | None = None,
        durations: list[int] | None = None,
    ) -> dict[str, Any]:
        st = self.state
        # Like the engine's zap events: state stamped with the call's time.
        st["last_at"] = at
        if op == "create_vcpu":
            if args["id"] in st["vcpus"]:
                raise KvmError(errno.EEXIST, "vcpu exists")
            st["vcpus"].append(args["id"])
            return {"id": args["id"]}
        if op == "enable_cap":
            if args["cap"] != 213:
                raise KvmError(errno.EINVAL, "cap")
            st["disabled_quirks"] |= args["args"][0]
            return {}
        if op == "set_user_memory_region":
            slot = str(args["slot"])
            if args["memory_size"] == 0:
                if slot not in st["memslots"]:
                    raise KvmError(errno.EINVAL, "no slot")
                del st["memslots"][slot]
                return {"change": "delete", "memslot": None, "zap": {}}
            st["memslots"][slot] = dict(args)
            return {"change": "create", "memslot": dict(args), "zap": None}
        if op == "host_write":
            st["host"][str(args["userspace_addr"])] = args["data"]
            return {}
        if op == "bump":
            st["counter"] += args.get("by", 1)
            return {"counter": st["counter"]}
        if op == "bump_then_fail":
            # Like a failed memslot MOVE: the zap already happened when the late check fails.
            st["counter"] += 1
            e = KvmError(errno.EINVAL, "failed after changing state")
            e.state_changed = True  # type: ignore[attr-defined]
            raise e
        if op == "slow":
            time.sleep(args["s"])
            st["counter"] += 1
            return {"counter": st["counter"]}
        if op == "gate":
            GATES[args["name"] + ".entered"].set()
            if not GATES[args["name"]].wait(60):
                raise KvmError(errno.ETIMEDOUT, "gate never opened")
            st["counter"] += 1
            return {"counter": st["counter"]}
        if op == "big_result":
            return {"data": "ab" * args["n"]}
        if op == "destroy":
            st["memslots"] = {}
            return {"zapped": 0}
        raise KvmError(errno.EINVAL, f"unknown op {op}")

    def info(self) -> dict[str, Any]:
        return {"nr_memslots": len(self.state["memslots"]), "counter": self.state["counter"]}

    def memslots(self) -> list[dict[str, Any]]:
        return [self.state["memslots"][k] for k in sorted(self.state["memslots"], key=int)]

    def stats(self) -> dict[str, int]:
        return {"counter": self.state["counter"], "vcpus": len(self.state["vcpus"])}


def dumps(vm: FakeVm) -> bytes:
    body = zlib.compress(json.dumps(vm.state, sort_keys=True).encode())
    return MAGIC + hashlib.sha256(body).digest() + struct.pack("<Q", len(body)) + body


def loads(b: bytes) -> FakeVm:
    if b[:8] != MAGIC or len(b) < 48:
        raise FakeCorrupt("bad header")
    digest, (n,) = b[8:40], struct.unpack("<Q", b[40:48])
    body = b[48:]
    if len(body) != n or hashlib.sha256(body).digest() != digest:
        raise FakeCorrupt("checksum mismatch")
    vm = FakeVm(0, 0, 4, None)
    vm.state = json.loads(zlib.decompress(body))
    return vm


FAKE_ENGINE = EnginePort(
    create=FakeVm.create, dumps=dumps, loads=loads, corrupt_snapshot=FakeCorrupt
)

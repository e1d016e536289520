"""Helpers shared by the engine tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from app.engine.errors import KvmError


def expect(err: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> KvmError:
    """Call `fn` and check it is rejected with exactly `err`."""
    with pytest.raises(KvmError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    return info.value


def fingerprint(vm: Any) -> str:
    """All that is observable of a Vm (timestamps aside): shows a failed call changed nothing."""
    events = [
        {k: v for k, v in e.items() if k not in ("at", "duration_us")} for e in vm.zap_events()
    ]
    state = {
        "info": vm.info(),
        "quirks": vm.quirks(),
        "memslots": vm.memslots(),
        "gmem": vm.guest_memfds(),
        "gmem_alloc": (vm.gmem.next_fd, vm.gmem.next_pfn),
        "attributes": vm.memory_attributes(),
        "stats": vm.stats(),
        "roots": vm.roots(),
        "events": events,
        "generations": [s.generation for s in vm.spaces],
        "invalid": [s.invalid for space in vm.spaces for s in space],
        "manual_dirty_log": vm.manual_dirty_log,
    }
    return json.dumps(state, sort_keys=True, default=str)

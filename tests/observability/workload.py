"""Calls that make every kind of event: slots, faults, a refault, zaps with the quirk on/off."""

from __future__ import annotations

import httpx

from app.engine import uapi
from tests.api.helpers import MiB, new_vm, ok, put_slot

SLOT_ZAP_ALL = int(uapi.Quirk.KVM_X86_QUIRK_SLOT_ZAP_ALL)


async def disable_slot_zap_all(client: httpx.AsyncClient, vm: str) -> None:
    ok(
        await client.post(
            f"/v1/vms/{vm}/enable-cap",
            json={"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [SLOT_ZAP_ALL]},
        )
    )


async def touch(client: httpx.AsyncClient, vm: str, gpa: int, size: int) -> dict:
    r = await client.post(
        f"/v1/vms/{vm}/vcpus/0/accesses", json={"gpa": gpa, "size": size, "access": "write"}
    )
    return ok(r)  # type: ignore[no-any-return]


async def delete_a_slot(client: httpx.AsyncClient, *, quirk: bool) -> str:
    """A VM with two 2 MiB slots, both touched (4K pages), then slot 1 deleted: with the quirk
    on that is a fast zap of everything, off it zaps slot 1's leaves only."""
    vm = await new_vm(client)
    if not quirk:
        await disable_slot_zap_all(client, vm)
    ok(await put_slot(client, vm, 0, gpa=0, size=2 * MiB))
    ok(await put_slot(client, vm, 1, gpa=2 * MiB, size=2 * MiB))
    await touch(client, vm, 0, 64 * 1024)
    await touch(client, vm, 2 * MiB, 32 * 1024)
    ok(await client.delete(f"/v1/vms/{vm}/memslots/1"))
    return vm


async def refault_after_zap_all(client: httpx.AsyncClient, vm: str) -> dict:
    """Touch slot 0 again after the fast zap took its leaves: every page is a refault."""
    return await touch(client, vm, 0, 64 * 1024)

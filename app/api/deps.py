"""Dependencies shared by the routers: the VM service, If-Match, ETag, pagination."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

from fastapi import Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError

from app.api.errors import ApiProblem
from app.api.schemas.common import ID_PATTERN, INT_STRING_PATTERN, U32, Limit, parse_int

if TYPE_CHECKING:
    from app.engine.op import Op
    from app.engine.vm import Vm

T = TypeVar("T")
# A list item: an open dict or an engine view (a TypedDict).
Row = TypeVar("Row", bound=Mapping[str, Any])


class VmServiceLike(Protocol):
    """What the routers need of `app.services.vms.VmService` (kept structural so the API
    layer depends on the interface, not on persistence)."""

    async def ready(self) -> dict[str, Any]: ...

    async def create_vm(
        self,
        *,
        name: str | None,
        vm_type: int | None = None,
        vcpus: int | None = None,
        paging_levels: int | None = None,
        from_snapshot: str | None = None,
        tenant: str = "default",
        td_lifecycle: bool = False,
        host: dict[str, bool] | None = None,
        only_tenant: str | None = None,
    ) -> tuple[dict[str, Any], str]: ...

    async def list_vms(
        self, *, limit: int, cursor: str | None, tenant: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]: ...

    async def vm_tenant(self, vm_id: str) -> str | None: ...

    def tenant_of(self, vm_id: str | None) -> str | None: ...

    async def get_vm(self, vm_id: str) -> tuple[dict[str, Any], str]: ...

    async def delete_vm(self, vm_id: str, *, if_match: str | None = None) -> dict[str, Any]: ...

    async def mutate(
        self, vm_id: str, op: Op, args: None = None, *, if_match: str | None = None
    ) -> tuple[dict[str, Any], str]: ...

    async def mutate_batch(
        self, vm_id: str, calls: list[tuple[str, dict[str, Any]]], *, if_match: str | None = None
    ) -> tuple[list[Any], str]: ...

    async def read(self, vm_id: str, fn: Callable[[Vm], T]) -> tuple[T, str]: ...

    async def create_snapshot(self, vm_id: str, *, label: str | None = None) -> dict[str, Any]: ...

    async def get_snapshot(self, vm_id: str, snapshot_id: str) -> dict[str, Any]: ...

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> str: ...

    async def list_snapshots(self, vm_id: str) -> list[dict[str, Any]]: ...

    async def restore_snapshot(
        self, vm_id: str, snapshot_id: str, *, if_match: str | None = None
    ) -> tuple[dict[str, Any], str]: ...

    async def stats_summaries(self) -> dict[str, dict[str, Any]]: ...

    def loaded_vms(self) -> dict[str, Any]: ...


def get_service(request: Request) -> VmServiceLike:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ApiProblem(503, "Service Unavailable", "the VM service is not started", "unavailable")
    return service


async def _service(request: Request) -> VmServiceLike:
    # Dependencies are coroutines: FastAPI runs a plain `def` one in a worker thread, and
    # those thread hops cost more than a journaled call.
    return get_service(request)


ServiceDep = Annotated[VmServiceLike, Depends(_service)]


async def _if_match(
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            description="Apply only if the VM's state version (its ETag) is this one; "
            "412 otherwise.",
        ),
    ] = None,
) -> str | None:
    # Passed on as sent (a list of entity tags or `*`): the service compares it with the
    # version under the VM lock, where no other call can move it.
    if if_match is None or not if_match.strip():
        return None
    return if_match.strip()


IfMatchDep = Annotated[str | None, Depends(_if_match)]

# A cursor is the key of the last item of the previous page, so each list knows what one
# looks like; anything else is malformed (422 naming query.cursor), whether or not the list
# is empty. Integer keys (slot, fd, seq, id, address, position) come back in decimal.
Cursor = Annotated[
    str | None,
    Query(
        pattern=INT_STRING_PATTERN,
        description="`next_cursor` of the previous page (an integer key).",
    ),
]
VmCursor = Annotated[
    str | None,
    Query(pattern=r"^vm-[0-9a-f]{1,64}$", description="`next_cursor` of the previous page."),
]
SnapshotCursor = Annotated[
    str | None,
    Query(pattern=r"^snap-[0-9a-f]{1,64}$", description="`next_cursor` of the previous page."),
]
LimitQ = Annotated[Limit, Query()]

VmId = Annotated[str, Path(description="The VM id (opaque).", pattern=ID_PATTERN)]
Vcpu = Annotated[U32, Path(description="vCPU id.")]


def name_list(
    value: str | None, known: Sequence[str], param: str, what: str
) -> frozenset[str] | None:
    """A comma-separated query parameter of names from `known` (None: not given); an
    unknown name is a 422 naming the parameter and listing what is known."""
    if value is None or not value.strip():
        return None
    wanted = frozenset(t.strip() for t in value.split(",") if t.strip())
    unknown = sorted(wanted - set(known))
    if unknown:
        msg = f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}"
        raise RequestValidationError([{"loc": ("query", param), "msg": msg, "type": "enum"}])
    return wanted


def set_etag(response: Response, etag: str) -> None:
    response.headers["ETag"] = etag if etag.startswith(('"', "W/")) else f'"{etag}"'


def paginate(
    items: Sequence[Row],
    key: Callable[[Row], int | str],
    limit: int,
    cursor: str | None,
    *,
    descending: bool = False,
) -> dict[str, Any]:
    """Keyset pagination over a list already ordered by `key`: the cursor is the last key
    returned, so a page stays right when items before it are added or removed."""
    start = 0
    if cursor is not None and items:
        after: int | str = cursor
        if isinstance(key(items[0]), int):
            try:
                after = parse_int(cursor)
            except ValueError:
                raise bad_cursor() from None
        start = len(items)
        for i, it in enumerate(items):
            k = key(it)
            if (k < after) if descending else (k > after):  # type: ignore[operator]
                start = i
                break
    page = list(items[start : start + limit])
    more = start + limit < len(items)
    return {"items": page, "next_cursor": str(key(page[-1])) if more and page else None}


def bad_cursor() -> RequestValidationError:
    """The 422 a malformed cursor gets, shaped like any other bad parameter."""
    return RequestValidationError(
        [
            {
                "loc": ("query", "cursor"),
                "msg": "not a cursor this list returned",
                "type": "cursor_invalid",
            }
        ]
    )


async def mutate(
    service: VmServiceLike,
    vm_id: str,
    op: Op,
    if_match: str | None,
    response: Response,
) -> dict[str, Any]:
    """One engine operation through the service (locked, journaled); the answer carries the
    ETag."""
    result, etag = await service.mutate(vm_id, op, if_match=if_match)
    set_etag(response, etag)
    return result


async def query(service: VmServiceLike, vm_id: str, fn: Callable[[Vm], T], response: Response) -> T:
    """A read-only engine query under the VM lock; the answer carries the ETag it saw."""
    result, etag = await service.read(vm_id, fn)
    set_etag(response, etag)
    return result


__all__ = [
    "Cursor",
    "SnapshotCursor",
    "VmCursor",
    "IfMatchDep",
    "LimitQ",
    "ServiceDep",
    "U32",
    "Vcpu",
    "VmId",
    "VmServiceLike",
    "mutate",
    "paginate",
    "query",
    "set_etag",
]

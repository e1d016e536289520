"""SDK-friendly names in the OpenAPI spec: `resource_verb` operation ids, schema names without
generator suffixes, integer bounds as exact integers."""

from __future__ import annotations

import re
from typing import Any

from fastapi.routing import APIRoute

# Endpoint function → operation id (`resource_verb`): what SDK methods are called. Ids are
# a contract: a new route needs an entry (a test checks every route has one).
OPERATION_IDS = {
    "healthz": "health_get",
    "readyz": "readiness_get",
    "metrics": "metrics_get",
    "get_trace": "trace_get",
    "get_capabilities": "capabilities_get",
    "create_vm": "vms_create",
    "list_vms": "vms_list",
    "get_vm": "vms_get",
    "delete_vm": "vms_delete",
    "get_vm_capabilities": "vm_capabilities_get",
    "enable_cap": "vms_enable_cap",
    "get_quirks": "quirks_get",
    "create_vcpu": "vcpus_create",
    "list_vcpus": "vcpus_list",
    "set_vcpu_smm": "vcpus_set_smm",
    "set_memslot": "memslots_set",
    "delete_memslot": "memslots_delete",
    "batch_memslots": "memslots_batch",
    "get_memslot": "memslots_get",
    "list_memslots": "memslots_list",
    "get_dirty_log": "dirty_log_get",
    "clear_dirty_log": "dirty_log_clear",
    "create_guest_memfd": "guest_memfds_create",
    "list_guest_memfds": "guest_memfds_list",
    "fallocate_guest_memfd": "guest_memfds_fallocate",
    "close_guest_memfd": "guest_memfds_close",
    "read_guest_memfd": "guest_memfds_read",
    "write_guest_memfd": "guest_memfds_write",
    "set_memory_attributes": "memory_attributes_set",
    "get_memory_attributes": "memory_attributes_list",
    "access_memory": "guest_access",
    "load": "guest_load",
    "store": "guest_store",
    "pre_fault": "guest_pre_fault",
    "accept": "guest_accept",
    "read_host_memory": "host_memory_read",
    "write_host_memory": "host_memory_write",
    "discard_host_memory": "host_memory_discard",
    "advise_host_memory": "host_memory_advise",
    "map_host_memory": "host_memory_map",
    "create_zap": "zaps_create",
    "list_zaps": "zaps_list",
    "stream_zaps": "zaps_stream",
    "set_zap_policy": "zap_policy_set",
    "translate": "translate_get",
    "list_mappings": "mappings_list",
    "list_roots": "roots_list",
    "get_stats": "stats_get",
    "get_stat_descriptors": "stat_descriptors_list",
    "audit": "audit_get",
    "get_tdx_state": "tdx_get",
    "tdx_init_vm": "tdx_init_vm",
    "tdx_finalize_vm": "tdx_finalize_vm",
    "tdx_init_vcpu": "tdx_init_vcpu",
    "tdx_init_mem_region": "tdx_init_mem_region",
    "tdvmcall_map_gpa": "guest_map_gpa",
    "complete_hypercall": "guest_complete_hypercall",
    "hypercall": "guest_hypercall",
    "recover_nx_huge_pages": "nx_huge_pages_recover",
    "create_snapshot": "snapshots_create",
    "list_snapshots": "snapshots_list",
    "restore_snapshot": "snapshots_restore",
    "get_snapshot": "snapshots_get",
    "delete_snapshot": "snapshots_delete",
    "label_snapshot": "snapshots_label",
    "replay_run": "replay_run",
    "whatif_run": "whatif_run",
    "stream_events": "events_stream",
    "stream_vm_events": "vm_events_stream",
    "create_token": "tokens_create",
    "list_tokens": "tokens_list",
    "get_token": "tokens_get",
    "revoke_token": "tokens_revoke",
}


def operation_id(route: APIRoute) -> str:
    known = OPERATION_IDS.get(route.name)
    if known is not None:
        return known
    # A route not listed yet: still `resource_verb`-shaped and stable (tag, then name).
    tag = str(route.tags[0]) if route.tags else "default"
    return f"{tag.replace('-', '_')}_{route.name}"


_PAGE = re.compile(r"^Page_(\w+?)_$")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "default")
# FastAPI's OpenAPI model types bounds as floats: 2**64 - 1 comes out as 2**64.
_EXACT = {float((1 << b) - 1): (1 << b) - 1 for b in (8, 16, 32, 53, 63, 64)}


def _fix(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                base, _, name = v.rpartition("/")
                v = f"{base}/{renames.get(name, name)}"
            elif k == "title" and isinstance(v, str) and v in renames:
                v = renames[v]
            elif k in _BOUNDS and isinstance(v, float) and v.is_integer():
                v = _EXACT.get(v, int(v))
            out[k] = _fix(v, renames)
        return out
    if isinstance(node, list):
        return [_fix(v, renames) for v in node]
    return node


def sdk_friendly(spec: dict[str, Any]) -> dict[str, Any]:
    """`Page_VmInfo_` → `VmInfoPage`; integral float bounds → exact integers."""
    schemas = spec.get("components", {}).get("schemas", {})
    renames = {}
    for name in schemas:
        m = _PAGE.match(name)
        if m:
            renames[name] = f"{m.group(1)}Page"
    spec = _fix(spec, renames)
    comps = spec.get("components", {}).get("schemas", {})
    spec["components"]["schemas"] = {renames.get(k, k): v for k, v in comps.items()}
    return spec


def token_optional(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec of a service running open (no admin token): every call may also be made
    without a token (`{}` among the security requirements, OpenAPI's "optional")."""
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            if op.get("security") and {} not in op["security"]:
                op["security"] = [*op["security"], {}]
    return spec

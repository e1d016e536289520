"""The read models (views.py): every field its type declares, of the type it declares, on a
small default VM and a small TD; and the values a small VM gives."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest

from app.engine import Vm, views
from app.engine.ops import parse
from app.engine.stat_descriptors import DESCRIPTORS

from .mmu import DEFAULT, HVA, M2, MB, PAGE, S47, access, attrs, hugepage, region, td_with_gmem


def conforms(value: Any, tp: Any) -> None:
    """`value` is of type `tp`: a TypedDict has exactly its keys; ints are Python ints (not
    bools, not numpy scalars), so the JSON the API writes is what the type says."""
    origin = get_origin(tp)
    if is_typeddict(tp):
        hints = get_type_hints(tp)
        assert isinstance(value, dict), value
        assert set(value) == set(hints), (set(value), set(hints))
        for k, t in hints.items():
            conforms(value[k], t)
    elif origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return conforms(value, arm)
            except AssertionError as e:
                errors.append(e)
        raise AssertionError(f"{value!r} is none of {tp}: {errors}")
    elif origin is list:
        assert isinstance(value, list)
        for v in value:
            conforms(v, get_args(tp)[0])
    elif origin is dict:
        assert isinstance(value, dict)
        kt, vt = get_args(tp)
        for k, v in value.items():
            conforms(k, kt)
            conforms(v, vt)
    elif tp is type(None):
        assert value is None
    elif tp is object:
        pass
    else:
        assert type(value) is tp, (value, tp)


def _vm() -> Vm:
    """4 KiB leaves at GPA 0-2 MiB, a 2 MiB leaf at 2-4 MiB (a THP behind it)."""
    vm = Vm.create(DEFAULT, 1)
    region(vm, 0, 0, 4 * MB, HVA)
    hugepage(vm, HVA + M2, M2)
    access(vm, 0, 4 * MB, "write")
    return vm


def _td() -> Vm:
    """Two accepted private pages at GPA 0 (mirror root), three shared ones at 2 MiB."""
    td, _ = td_with_gmem(4 * MB)
    attrs(td, 2 * MB, 2 * MB, False)
    td.apply(parse("accept", {"vcpu": 0, "gpa": 0, "size": 2 * PAGE}))
    access(td, S47 | 2 * MB, 3 * PAGE, "write")
    return td


@pytest.mark.parametrize("make", [_vm, _td], ids=["default", "tdx"])
def test_every_view_has_the_fields_of_its_type(make: Any) -> None:
    vm = make()
    conforms(views.translate(vm, 0x1234), views.TranslateView)
    conforms(views.mappings(vm), list[views.MappingView])
    conforms(views.roots(vm), list[views.RootView])
    conforms(views.stats(vm), views.StatsView)
    conforms(views.info(vm), dict[str, object])
    conforms(views.memslots(vm), list[dict[str, object]])
    # The query API of `Vm` is the views', unchanged.
    assert vm.translate(0x1234) == views.translate(vm, 0x1234)
    assert vm.mappings() == views.mappings(vm)
    assert vm.roots() == views.roots(vm)
    assert vm.stats() == views.stats(vm)


def test_translate_walks_to_the_leaf_and_its_host_address() -> None:
    vm = _vm()
    t = views.translate(vm, M2 + 0x5123)
    assert (t["gpa"], t["gfn"]) == (M2 + 0x5123, (M2 + 0x5123) >> 12)
    (walk,) = t["roots"]
    assert (walk["role"], walk["as_id"], walk["valid"]) == ("direct", 0, True)
    assert [e["level"] for e in walk["walk"]] == [4, 3, 2]
    assert [e["index"] for e in walk["walk"]] == [0, 0, 1]
    leaf = walk["leaf"]
    assert leaf is not None
    # A 2 MiB leaf: the frame is the huge page's plus the 4 KiB page inside it.
    assert leaf["level"] == 2 and leaf["pfn"] == ((HVA + M2) >> 12) + 5
    assert leaf["hpa"] == HVA + M2 + 0x5123
    assert (leaf["r"], leaf["w"], leaf["x"]) == (True, True, True)
    (unmapped,) = views.translate(vm, 8 * MB)["roots"]
    assert unmapped["leaf"] is None and unmapped["walk"][-1]["present"] is False


def test_translate_refuses_a_gpa_beyond_the_guest_physical_space() -> None:
    vm = _vm()
    for gpa in (-1, vm.gpa_limit, True, "0"):
        with pytest.raises(Exception, match="gpa must be in"):
            views.translate(vm, gpa)


def test_mappings_runs_roots_and_stats_of_a_small_vm() -> None:
    vm = _vm()
    runs = views.mappings(vm)
    assert [(m["level"], m["gfn"], m["position"], m["npages"]) for m in runs] == [
        (1, 0, 0, 512),
        (2, 512, 512, 512),
    ]
    assert runs[0]["pfn"] == HVA >> 12 and runs[0]["role"] == "direct"
    (root,) = views.roots(vm)
    assert root["sptes"] == {"4k": 512, "2m": 1, "1g": 0}
    assert (root["level"], root["valid"], root["obsolete"]) == (4, True, False)
    s = views.stats(vm)
    assert (s["pages_4k"], s["pages_2m"], s["shared_pages_4k"], s["private_pages_4k"]) == (
        512,
        1,
        512,
        0,
    )
    assert s["roots"] == 1 and s["page_tables"] == 4
    assert not any(k.startswith("tdx_") for k in s)


def test_stats_names_are_the_descriptors() -> None:
    """The API's `Stats` model is built from the descriptors: a TD has every name, another
    VM every name but the TDX ones."""
    names = [d.name for d in DESCRIPTORS]
    assert sorted(views.stats(_td())) == sorted(names)
    assert sorted(views.stats(_vm())) == sorted(d.name for d in DESCRIPTORS if not d.tdx_only)


def test_a_td_has_a_mirror_and_a_direct_view() -> None:
    td = _td()
    by_role = {r["role"]: r for r in views.roots(td)}
    assert by_role["mirror"]["sptes"]["4k"] == 2 and by_role["direct"]["sptes"]["4k"] == 3
    runs = {m["role"]: m for m in views.mappings(td)}
    # The shared root indexes GFNs with the shared bit; `gfn` is without it.
    assert runs["direct"]["gfn"] == M2 >> 12
    assert runs["direct"]["position"] == (S47 | M2) >> 12
    t = views.translate(td, S47 | 0x1000)
    assert t["gfn"] == 1
    leaves = {w["role"]: w["leaf"] for w in t["roots"]}
    assert leaves["mirror"] is not None and leaves["direct"] is None
    s = views.stats(td)
    assert (s["private_pages_4k"], s["shared_pages_4k"], s["tdx_accepted_pages"]) == (2, 3, 2)
    state = views.tdx_state(td)
    assert state["map_gpa_pending"] == [] and state["accepted_pages"] == 2
    with pytest.raises(Exception, match="not a TD"):
        views.tdx_state(_vm())

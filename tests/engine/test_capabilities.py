"""KVM_CHECK_EXTENSION, KVM_CREATE_VM types and KVM_ENABLE_CAP rules, with errno."""

from __future__ import annotations

import errno

import pytest

from app.engine import uapi
from app.engine.capabilities import (
    check_manual_dirty_log,
    check_vm_type,
    disable_quirks,
    extensions,
    initial_disabled_quirks,
    kvm_check_extension,
    quirks_view,
    vm_check_extension,
)
from app.engine.ops import parse
from app.engine.vm import Vm
from tests.engine import expect, fingerprint
from tests.engine.mmu import apply_json

Cap = uapi.Cap
Q = uapi.Quirk
DEFAULT = int(uapi.VmType.KVM_X86_DEFAULT_VM)
SW_PROT = int(uapi.VmType.KVM_X86_SW_PROTECTED_VM)
TDX = int(uapi.VmType.KVM_X86_TDX_VM)
SLOT_ZAP_ALL = int(Q.KVM_X86_QUIRK_SLOT_ZAP_ALL)
CD_NW = int(Q.KVM_X86_QUIRK_CD_NW_CLEARED)
PAT = int(Q.KVM_X86_QUIRK_IGNORE_GUEST_PAT)


# -- KVM_CHECK_EXTENSION -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "cap,value",
    [
        (Cap.KVM_CAP_USER_MEMORY, 1),
        (Cap.KVM_CAP_NR_MEMSLOTS, 32764),
        (Cap.KVM_CAP_READONLY_MEM, 1),
        (Cap.KVM_CAP_DISABLE_QUIRKS, 1),
        (Cap.KVM_CAP_X86_SMM, 1),
        (Cap.KVM_CAP_MULTI_ADDRESS_SPACE, 2),
        (Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3),
        (Cap.KVM_CAP_DISABLE_QUIRKS2, 0x7FF),
        (Cap.KVM_CAP_USER_MEMORY2, 1),
        (Cap.KVM_CAP_MEMORY_FAULT_INFO, 1),
        (Cap.KVM_CAP_MEMORY_ATTRIBUTES, 8),
        (Cap.KVM_CAP_GUEST_MEMFD, 1),
        (Cap.KVM_CAP_VM_TYPES, 0b100011),
        (Cap.KVM_CAP_PRE_FAULT_MEMORY, 1),
        (Cap.KVM_CAP_GUEST_MEMFD_FLAGS, 3),
    ],
)
def test_dev_kvm_answers(cap: int, value: int) -> None:
    assert kvm_check_extension(int(cap)) == value
    assert kvm_check_extension(Cap(cap).name) == value


@pytest.mark.parametrize("cap", [0, 9999, -1, 1 << 70])
def test_unknown_caps_answer_zero(cap: int) -> None:
    assert kvm_check_extension(cap) == 0
    assert vm_check_extension(cap, DEFAULT) == 0


def test_unknown_cap_name_is_einval() -> None:
    expect(errno.EINVAL, kvm_check_extension, "KVM_CAP_NOPE")


@pytest.mark.parametrize(
    "cap,default,sw_prot,tdx",
    [
        (Cap.KVM_CAP_READONLY_MEM, 1, 1, 0),
        (Cap.KVM_CAP_MULTI_ADDRESS_SPACE, 2, 1, 1),
        (Cap.KVM_CAP_MEMORY_ATTRIBUTES, 0, 8, 8),
        (Cap.KVM_CAP_GUEST_MEMFD_FLAGS, 3, 1, 1),
        (Cap.KVM_CAP_X86_SMM, 1, 1, 0),
        (Cap.KVM_CAP_GUEST_MEMFD, 1, 1, 1),
        (Cap.KVM_CAP_DISABLE_QUIRKS2, 0x7FF, 0x7FF, 0x7FF),
        (Cap.KVM_CAP_NR_MEMSLOTS, 32764, 32764, 32764),
        (Cap.KVM_CAP_VM_TYPES, 0x23, 0x23, 0x23),
    ],
)
def test_vm_answers_per_type(cap: int, default: int, sw_prot: int, tdx: int) -> None:
    assert [vm_check_extension(int(cap), t) for t in (DEFAULT, SW_PROT, TDX)] == [
        default,
        sw_prot,
        tdx,
    ]


def test_extensions_lists_every_cap_by_name() -> None:
    system = extensions()
    assert system["KVM_CAP_NR_MEMSLOTS"] == 32764 and len(system) == len(Cap)
    assert extensions(TDX)["KVM_CAP_READONLY_MEM"] == 0


# -- KVM_CREATE_VM type ------------------------------------------------------------------------
@pytest.mark.parametrize("vm_type", [0, 1, 5, "KVM_X86_DEFAULT_VM", "KVM_X86_TDX_VM"])
def test_supported_vm_types(vm_type: object) -> None:
    assert check_vm_type(vm_type) in (DEFAULT, SW_PROT, TDX)


@pytest.mark.parametrize(
    "vm_type",
    [2, 3, 4, "KVM_X86_SNP_VM", "KVM_X86_SEV_VM", 6, 31, 32, 64, -1, 1 << 64, "x", None, True, 1.0],
)
def test_unsupported_vm_types_are_einval(vm_type: object) -> None:
    expect(errno.EINVAL, check_vm_type, vm_type)


# -- quirks ------------------------------------------------------------------------------------
def test_initial_disabled_quirks() -> None:
    assert initial_disabled_quirks(DEFAULT) == CD_NW
    assert initial_disabled_quirks(SW_PROT) == CD_NW
    assert initial_disabled_quirks(TDX) == CD_NW | PAT
    for t in (DEFAULT, SW_PROT, TDX):
        assert not initial_disabled_quirks(t) & SLOT_ZAP_ALL  # enabled by default for every VM


@pytest.mark.parametrize("cap", [Cap.KVM_CAP_DISABLE_QUIRKS, Cap.KVM_CAP_DISABLE_QUIRKS2])
def test_disable_quirks_ors_bits_in(cap: int) -> None:
    assert disable_quirks(CD_NW, int(cap), 0, [SLOT_ZAP_ALL, 0, 0, 0]) == CD_NW | SLOT_ZAP_ALL


@pytest.mark.parametrize("cap", [Cap.KVM_CAP_DISABLE_QUIRKS, Cap.KVM_CAP_DISABLE_QUIRKS2])
def test_disabling_is_sticky(cap: int) -> None:
    disabled = disable_quirks(0, int(cap), 0, [SLOT_ZAP_ALL])
    assert disable_quirks(disabled, int(cap), 0, [0]) == SLOT_ZAP_ALL
    assert disable_quirks(disabled, int(cap), 0, [1]) == SLOT_ZAP_ALL | 1


@pytest.mark.parametrize("mask", [1 << 11, 1 << 63, SLOT_ZAP_ALL | 1 << 12])
def test_disable_quirks2_unsupported_bits_are_einval(mask: int) -> None:
    expect(errno.EINVAL, disable_quirks, CD_NW, "KVM_CAP_DISABLE_QUIRKS2", 0, [mask])


def test_legacy_disable_quirks_drops_unsupported_bits() -> None:
    mask = SLOT_ZAP_ALL | 1 << 11 | 1 << 40
    assert disable_quirks(0, "KVM_CAP_DISABLE_QUIRKS", 0, [mask]) == SLOT_ZAP_ALL


@pytest.mark.parametrize("cap", ["KVM_CAP_DISABLE_QUIRKS", "KVM_CAP_DISABLE_QUIRKS2"])
@pytest.mark.parametrize("flags", [1, 1 << 31])
def test_enable_cap_flags_must_be_zero(cap: str, flags: int) -> None:
    expect(errno.EINVAL, disable_quirks, 0, cap, flags, [SLOT_ZAP_ALL])


@pytest.mark.parametrize(
    "args", [[1, 2, 3, 4, 5], "0x80", [-1], [1 << 64], [None], {"a": 1}, [True]]
)
def test_enable_cap_args_shape(args: object) -> None:
    expect(errno.EINVAL, disable_quirks, 0, "KVM_CAP_DISABLE_QUIRKS2", 0, args)


@pytest.mark.parametrize("flags", [-1, 1 << 32, "0", None])
def test_enable_cap_flags_that_do_not_fit_are_einval(flags: object) -> None:
    expect(errno.EINVAL, disable_quirks, 0, "KVM_CAP_DISABLE_QUIRKS2", flags, [0])


def test_disable_quirks_missing_args_mean_zero() -> None:
    assert disable_quirks(CD_NW, "KVM_CAP_DISABLE_QUIRKS2", 0, None) == CD_NW
    assert disable_quirks(CD_NW, "KVM_CAP_DISABLE_QUIRKS2", 0, []) == CD_NW


def test_disable_quirks_refuses_other_caps() -> None:
    expect(errno.EINVAL, disable_quirks, 0, "KVM_CAP_NR_MEMSLOTS", 0, [0])
    expect(errno.EINVAL, disable_quirks, 0, "KVM_CAP_BOGUS", 0, [0])


# -- KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ---------------------------------------------------------
@pytest.mark.parametrize("value", [0, 1, 3])
def test_manual_dirty_log_accepted_values(value: int) -> None:
    assert check_manual_dirty_log(0, [value]) == value


@pytest.mark.parametrize("value", [2, 4, 5, 1 << 63])
def test_manual_dirty_log_invalid_values_are_einval(value: int) -> None:
    expect(errno.EINVAL, check_manual_dirty_log, 0, [value])


def test_manual_dirty_log_flags_must_be_zero() -> None:
    expect(errno.EINVAL, check_manual_dirty_log, 1, [1])


# -- GET …/quirks ------------------------------------------------------------------------------
def test_quirks_view_default_vm() -> None:
    view = quirks_view(DEFAULT, initial_disabled_quirks(DEFAULT))
    assert view["disabled_mask"] == CD_NW
    assert view["enabled_mask"] == 0x7FF & ~CD_NW
    quirks = {q["name"]: q for q in view["quirks"]}  # type: ignore[attr-defined]
    assert len(quirks) == 11
    zap = quirks["KVM_X86_QUIRK_SLOT_ZAP_ALL"]
    assert (zap["bit"], zap["value"], zap["enabled"], zap["applicable"]) == (7, 0x80, True, True)
    assert quirks["KVM_X86_QUIRK_CD_NW_CLEARED"]["enabled"] is False
    assert quirks["KVM_X86_QUIRK_CD_NW_CLEARED"]["applicable"] is False
    assert quirks["KVM_X86_QUIRK_IGNORE_GUEST_PAT"]["applicable"] is True


@pytest.mark.parametrize("vm_type", [SW_PROT, TDX])
def test_slot_zap_all_applies_only_to_default_vms(vm_type: int) -> None:
    view = quirks_view(vm_type, initial_disabled_quirks(vm_type))
    quirks = {q["name"]: q for q in view["quirks"]}  # type: ignore[attr-defined]
    zap = quirks["KVM_X86_QUIRK_SLOT_ZAP_ALL"]
    assert zap["enabled"] is True and zap["applicable"] is False


def test_tdx_ignore_guest_pat_disabled_and_inapplicable() -> None:
    view = quirks_view(TDX, initial_disabled_quirks(TDX))
    quirks = {q["name"]: q for q in view["quirks"]}  # type: ignore[attr-defined]
    pat = quirks["KVM_X86_QUIRK_IGNORE_GUEST_PAT"]
    assert pat["enabled"] is False and pat["applicable"] is False


def test_quirks_view_after_disabling_slot_zap_all() -> None:
    disabled = disable_quirks(
        initial_disabled_quirks(DEFAULT), "KVM_CAP_DISABLE_QUIRKS2", 0, [0x80]
    )
    view = quirks_view(DEFAULT, disabled)
    assert view["disabled_mask"] == CD_NW | SLOT_ZAP_ALL
    assert not view["enabled_mask"] & SLOT_ZAP_ALL  # type: ignore[operator]


# -- through Vm ----------------------------------------------------------------------------------
@pytest.mark.parametrize("vm_type", [2, 3, 4, 6, "KVM_X86_SNP_VM"])
def test_vm_create_refuses_unsupported_types(vm_type: object) -> None:
    expect(errno.EINVAL, Vm.create, vm_type)


@pytest.mark.parametrize("vm_type", [DEFAULT, SW_PROT, TDX])
def test_vm_check_extension_and_initial_quirks(vm_type: int) -> None:
    vm = Vm.create(vm_type)
    assert vm.check_extension(int(Cap.KVM_CAP_MULTI_ADDRESS_SPACE)) == (2 if vm_type == 0 else 1)
    assert vm.quirks()["disabled_mask"] == initial_disabled_quirks(vm_type)


def test_apply_disable_quirks2_is_sticky() -> None:
    vm = Vm.create(DEFAULT)
    vm.apply(
        parse("enable_cap", {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [SLOT_ZAP_ALL, 0, 0, 0]})
    )
    vm.apply(parse("enable_cap", {"cap": int(Cap.KVM_CAP_DISABLE_QUIRKS2), "args": [0, 0, 0, 0]}))
    assert vm.quirks()["disabled_mask"] == CD_NW | SLOT_ZAP_ALL
    assert vm.info()["slot_zap_all_applies"] is False


@pytest.mark.parametrize(
    "args",
    [
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [1 << 11, 0, 0, 0]},
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "flags": 1, "args": [SLOT_ZAP_ALL]},
        {"cap": "KVM_CAP_DISABLE_QUIRKS", "flags": 1, "args": [SLOT_ZAP_ALL]},
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [SLOT_ZAP_ALL, 0, 0, 0, 0]},
        {"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": ["0x80"]},
        {"cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "args": [2]},
        {"cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "flags": 1, "args": [1]},
        {"cap": "KVM_CAP_NR_MEMSLOTS", "args": [1]},
        {"cap": "KVM_CAP_WHATEVER", "args": [1]},
        {"cap": 9999, "args": [1]},
    ],
)
def test_apply_enable_cap_rejected_changes_nothing(args: dict) -> None:
    vm = Vm.create(DEFAULT)
    before = fingerprint(vm)
    expect(errno.EINVAL, apply_json, vm, "enable_cap", args)
    assert fingerprint(vm) == before


def test_apply_manual_dirty_log_protect() -> None:
    vm = Vm.create(DEFAULT)
    vm.apply(parse("enable_cap", {"cap": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "args": [3]}))
    assert vm.manual_dirty_log == 3

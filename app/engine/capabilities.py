"""KVM_CHECK_EXTENSION, KVM_CREATE_VM's type rules and KVM_ENABLE_CAP for the caps we model.

The simulated host is Intel with EPT and TDX, current upstream (kvm-memslots.md §1.5, §4.2;
spec/README.md): disabling quirks is cumulative and sticky, DISABLE_QUIRKS2 refuses unknown bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import uapi
from .attributes import supported_attributes
from .errors import einval
from .gmem import supported_gmem_flags
from .op import Op, operation

if TYPE_CHECKING:
    from .state import KvmState

Cap = uapi.Cap
Quirk = uapi.Quirk

SUPPORTED_VM_TYPES_MASK = sum(1 << int(t) for t in uapi.SUPPORTED_VM_TYPES)

# /dev/kvm answers that do not depend on a VM.
_SYSTEM: dict[int, int] = {
    Cap.KVM_CAP_USER_MEMORY: 1,
    Cap.KVM_CAP_NR_MEMSLOTS: uapi.KVM_USER_MEM_SLOTS,
    Cap.KVM_CAP_READONLY_MEM: 1,
    Cap.KVM_CAP_DISABLE_QUIRKS: 1,
    Cap.KVM_CAP_X86_SMM: 1,
    Cap.KVM_CAP_MULTI_ADDRESS_SPACE: uapi.KVM_MAX_NR_ADDRESS_SPACES,
    Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: uapi.KVM_DIRTY_LOG_MANUAL_CAPS,
    Cap.KVM_CAP_EXIT_HYPERCALL: uapi.KVM_EXIT_HYPERCALL_VALID_MASK,
    Cap.KVM_CAP_DISABLE_QUIRKS2: uapi.SUPPORTED_QUIRKS,
    Cap.KVM_CAP_USER_MEMORY2: 1,
    Cap.KVM_CAP_MEMORY_FAULT_INFO: 1,
    Cap.KVM_CAP_MEMORY_ATTRIBUTES: supported_attributes(None),
    Cap.KVM_CAP_GUEST_MEMFD: 1,
    Cap.KVM_CAP_VM_TYPES: SUPPORTED_VM_TYPES_MASK,
    Cap.KVM_CAP_PRE_FAULT_MEMORY: 1,  # TDP (EPT) is enabled
    Cap.KVM_CAP_GUEST_MEMFD_FLAGS: supported_gmem_flags(None),
}


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise einval(f"{name} must be an integer: {value!r}")
    return value


def cap_number(cap: int | str) -> int:
    """A capability given by kernel name ("KVM_CAP_…") or number."""
    if isinstance(cap, str):
        try:
            return int(Cap.__members__[cap])
        except KeyError:
            raise einval(f"unknown capability {cap!r}") from None
    return _int(cap, "cap")


def kvm_check_extension(cap: int | str) -> int:
    """KVM_CHECK_EXTENSION on /dev/kvm; a capability we do not know answers 0."""
    number = cap_number(cap) if isinstance(cap, str) else cap
    if isinstance(number, bool) or not isinstance(number, int):
        return 0
    return _SYSTEM.get(number, 0)


def vm_check_extension(cap: int | str, vm_type: int) -> int:
    """KVM_CHECK_EXTENSION on a VM fd: some answers depend on the VM type."""
    number = cap_number(cap) if isinstance(cap, str) else cap
    if number == Cap.KVM_CAP_READONLY_MEM:
        return 0 if uapi.vm_has_protected_state(vm_type) else 1
    if number == Cap.KVM_CAP_MULTI_ADDRESS_SPACE:
        return uapi.nr_address_spaces(vm_type)
    if number == Cap.KVM_CAP_MEMORY_ATTRIBUTES:
        return supported_attributes(vm_type)
    if number == Cap.KVM_CAP_GUEST_MEMFD_FLAGS:
        return supported_gmem_flags(vm_type)
    if number == Cap.KVM_CAP_X86_SMM:
        # SMBASE is not an emulated MSR for a TD.
        return 0 if vm_type == uapi.VmType.KVM_X86_TDX_VM else 1
    return kvm_check_extension(number)


def extensions(vm_type: int | None = None) -> dict[str, int]:
    """Every capability we model with its answer, by kernel name (GET …/capabilities)."""
    if vm_type is None:
        return {c.name: kvm_check_extension(int(c)) for c in Cap}
    return {c.name: vm_check_extension(int(c), vm_type) for c in Cap}


# -- VM types --------------------------------------------------------------------------------
def check_vm_type(vm_type: object) -> int:
    """KVM_CREATE_VM's type: a type this Intel host does not support (AMD ones) → EINVAL
    (kvm-memslots.md §1.2)."""
    if isinstance(vm_type, str):
        try:
            vm_type = int(uapi.VmType.__members__[vm_type])
        except KeyError:
            raise einval(f"unknown VM type {vm_type!r}") from None
    value = _int(vm_type, "vm_type")
    if not 0 <= value < 32 or not SUPPORTED_VM_TYPES_MASK & (1 << value):
        raise einval(f"VM type {value} not supported by this host")
    return value


# -- quirks ----------------------------------------------------------------------------------
def initial_disabled_quirks(vm_type: int) -> int:
    """Quirks disabled at creation: the vendor's inapplicable ones; a TD also IGNORE_GUEST_PAT
    (kvm-memslots.md §4.2; tdx_vm_init, kvm-private-tdx.md §5.1)."""
    disabled = uapi.INAPPLICABLE_QUIRKS_INTEL & uapi.SUPPORTED_QUIRKS
    if vm_type == uapi.VmType.KVM_X86_TDX_VM:
        disabled |= int(Quirk.KVM_X86_QUIRK_IGNORE_GUEST_PAT)
    return disabled


def _cap_args(args: object) -> list[int]:
    """struct kvm_enable_cap.args: four u64, missing ones zero."""
    if args is None:
        args = []
    if not isinstance(args, Sequence) or isinstance(args, str | bytes) or len(args) > 4:
        raise einval("args must be a list of at most 4 integers")
    out = []
    for a in args:
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a <= uapi.U64_MASK:
            raise einval(f"cap argument does not fit a u64: {a!r}")
        out.append(a)
    return out + [0] * (4 - len(out))


def _cap_flags(flags: object) -> int:
    value = _int(flags, "flags")
    if not 0 <= value <= 0xFFFF_FFFF:
        raise einval("flags does not fit a u32")
    return value


def disable_quirks(current: int, cap: int | str, flags: object, args: object) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS / _QUIRKS2): the new disabled mask.

    Bits are only ever added (no re-enabling since v6.15). On error nothing changes.
    """
    number = cap_number(cap)
    if number not in (Cap.KVM_CAP_DISABLE_QUIRKS, Cap.KVM_CAP_DISABLE_QUIRKS2):
        raise einval(f"capability {number} is not a quirk capability")
    mask = _cap_args(args)[0]
    if _cap_flags(flags):
        raise einval("KVM_ENABLE_CAP flags must be 0")
    if number == Cap.KVM_CAP_DISABLE_QUIRKS2 and mask & ~uapi.SUPPORTED_QUIRKS:
        raise einval(f"quirks {mask & ~uapi.SUPPORTED_QUIRKS:#x} are not supported")
    # The legacy cap silently drops what is not supported.
    return current | (mask & uapi.SUPPORTED_QUIRKS)


def check_manual_dirty_log(flags: object, args: object) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): the new mode (it is assigned, not ORed).

    INITIALLY_SET is accepted only together with MANUAL_PROTECT_ENABLE
    (kvm_vm_ioctl_enable_cap_generic, KVM_DIRTY_LOG_MANUAL_CAPS).
    """
    value = _cap_args(args)[0]
    allowed = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if value & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        allowed = uapi.KVM_DIRTY_LOG_MANUAL_CAPS
    if _cap_flags(flags) or value & ~allowed:
        raise einval("invalid KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags/args")
    return value


def check_exit_hypercall(flags: object, args: object) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL): the hypercalls that exit to userspace, a mask
    within KVM_EXIT_HYPERCALL_VALID_MASK (x86.c kvm_vm_ioctl_enable_cap; assigned, not ORed)."""
    value = _cap_args(args)[0]
    if _cap_flags(flags) or value & ~uapi.KVM_EXIT_HYPERCALL_VALID_MASK:
        raise einval("KVM_CAP_EXIT_HYPERCALL: flags must be 0, args[0] within the valid mask")
    return value


def quirk_applicable(quirk: int, vm_type: int) -> bool:
    """Whether a quirk can have any effect for this VM type on this (Intel) host."""
    if quirk == Quirk.KVM_X86_QUIRK_CD_NW_CLEARED:
        return False  # an AMD-only quirk
    if quirk == Quirk.KVM_X86_QUIRK_IGNORE_GUEST_PAT:
        return vm_type != uapi.VmType.KVM_X86_TDX_VM
    if quirk == Quirk.KVM_X86_QUIRK_SLOT_ZAP_ALL:
        return vm_type == uapi.VmType.KVM_X86_DEFAULT_VM  # a VM-type test in the zap path
    return True


def quirks_view(vm_type: int, disabled: int) -> dict[str, object]:
    return {
        "enabled_mask": uapi.SUPPORTED_QUIRKS & ~disabled,
        "disabled_mask": disabled,
        "quirks": [
            {
                "name": q.name,
                "bit": int(q).bit_length() - 1,
                "value": int(q),
                "enabled": not disabled & int(q),
                "applicable": quirk_applicable(int(q), vm_type),
            }
            for q in Quirk
        ],
    }


@operation("enable_cap")
class EnableCap(Op):
    """KVM_ENABLE_CAP on the VM (capability by number or name)."""

    cap: int | str
    flags: int = 0
    args: list[int] | None = None


def enable_cap(vm: KvmState, op: EnableCap) -> dict[str, Any]:
    cap, flags, args = op.cap, op.flags, op.args
    number = cap_number(cap)
    args = [0, 0, 0, 0] if args is None else args
    if number in (uapi.Cap.KVM_CAP_DISABLE_QUIRKS, uapi.Cap.KVM_CAP_DISABLE_QUIRKS2):
        vm.disabled_quirks = disable_quirks(vm.disabled_quirks, number, flags, args)
    elif number == uapi.Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
        vm.manual_dirty_log = check_manual_dirty_log(flags, args)
    elif number == uapi.Cap.KVM_CAP_EXIT_HYPERCALL:
        vm.hypercall_exit_enabled = check_exit_hypercall(flags, args)
    else:
        raise einval(f"KVM_ENABLE_CAP does not support capability {number}")
    return {}

"""Constants of the KVM ABI that vkmmu models, with the kernel's names and values.

Sources: ../shared/spec/kvm-memslots.md §1 and kvm-private-tdx.md appendix A
(include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
"""

from __future__ import annotations

import enum
import functools

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# Memslot limits (x86).
KVM_MEM_SLOTS_NUM = 32767
KVM_INTERNAL_MEM_SLOTS = 3
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS  # 32764
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_MAX_NR_ADDRESS_SPACES = 2
TSS_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS
APIC_ACCESS_PAGE_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS + 1
IDENTITY_PAGETABLE_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS + 2

# The simulated host: an Intel CPU with EPT, 5-level EPT capable, MAXPHYADDR 52.
HOST_MAXPHYADDR = 52
# Highest user virtual address (exclusive end) per host paging mode (access_ok).
USER_ADDR_END_4LEVEL = 0x0000_7FFF_FFFF_F000
USER_ADDR_END_5LEVEL = 0x00FF_FFFF_FFFF_F000

U64_MASK = (1 << 64) - 1


class VmType(enum.IntEnum):
    KVM_X86_DEFAULT_VM = 0
    KVM_X86_SW_PROTECTED_VM = 1
    KVM_X86_SEV_VM = 2
    KVM_X86_SEV_ES_VM = 3
    KVM_X86_SNP_VM = 4
    KVM_X86_TDX_VM = 5


# VM types an Intel host with TDX supports (KVM_CAP_VM_TYPES).
SUPPORTED_VM_TYPES = frozenset(
    {VmType.KVM_X86_DEFAULT_VM, VmType.KVM_X86_SW_PROTECTED_VM, VmType.KVM_X86_TDX_VM}
)
PRIVATE_MEM_VM_TYPES = frozenset(
    {VmType.KVM_X86_SW_PROTECTED_VM, VmType.KVM_X86_SNP_VM, VmType.KVM_X86_TDX_VM}
)
PROTECTED_STATE_VM_TYPES = frozenset(
    {VmType.KVM_X86_SEV_ES_VM, VmType.KVM_X86_SNP_VM, VmType.KVM_X86_TDX_VM}
)


class MemFlag(enum.IntFlag):
    KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
    KVM_MEM_READONLY = 1 << 1
    KVM_MEM_GUEST_MEMFD = 1 << 2


KVM_MEM_LOG_DIRTY_PAGES = MemFlag.KVM_MEM_LOG_DIRTY_PAGES
KVM_MEM_READONLY = MemFlag.KVM_MEM_READONLY
KVM_MEM_GUEST_MEMFD = MemFlag.KVM_MEM_GUEST_MEMFD


class Quirk(enum.IntFlag):
    KVM_X86_QUIRK_LINT0_REENABLED = 1 << 0
    KVM_X86_QUIRK_CD_NW_CLEARED = 1 << 1
    KVM_X86_QUIRK_LAPIC_MMIO_HOLE = 1 << 2
    KVM_X86_QUIRK_OUT_7E_INC_RIP = 1 << 3
    KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT = 1 << 4
    KVM_X86_QUIRK_FIX_HYPERCALL_INSN = 1 << 5
    KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS = 1 << 6
    KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7
    KVM_X86_QUIRK_STUFF_FEATURE_MSRS = 1 << 8
    KVM_X86_QUIRK_IGNORE_GUEST_PAT = 1 << 9
    KVM_X86_QUIRK_VMCS12_ALLOW_FREEZE_IN_SMM = 1 << 10


KVM_X86_QUIRK_SLOT_ZAP_ALL = Quirk.KVM_X86_QUIRK_SLOT_ZAP_ALL
# Intel host with self-snoop, current upstream: bits 0-10 (kvm-memslots.md §4.2).
SUPPORTED_QUIRKS = int(sum(q.value for q in Quirk))
# Quirks disabled at VM creation on Intel (inapplicable): CD_NW_CLEARED; TDX adds IGNORE_GUEST_PAT.
INAPPLICABLE_QUIRKS_INTEL = int(Quirk.KVM_X86_QUIRK_CD_NW_CLEARED)


class Cap(enum.IntEnum):
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_READONLY_MEM = 81
    KVM_CAP_DISABLE_QUIRKS = 116
    KVM_CAP_X86_SMM = 117
    KVM_CAP_MULTI_ADDRESS_SPACE = 118
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
    KVM_CAP_EXIT_HYPERCALL = 201
    KVM_CAP_DISABLE_QUIRKS2 = 213
    KVM_CAP_USER_MEMORY2 = 231
    KVM_CAP_MEMORY_FAULT_INFO = 232
    KVM_CAP_MEMORY_ATTRIBUTES = 233
    KVM_CAP_GUEST_MEMFD = 234
    KVM_CAP_VM_TYPES = 235
    KVM_CAP_PRE_FAULT_MEMORY = 236
    KVM_CAP_GUEST_MEMFD_FLAGS = 244


# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 argument bits.
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3


class GmemFlag(enum.IntFlag):
    GUEST_MEMFD_FLAG_MMAP = 1 << 0
    GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1


SUPPORTED_GMEM_FLAGS = int(GmemFlag.GUEST_MEMFD_FLAG_MMAP | GmemFlag.GUEST_MEMFD_FLAG_INIT_SHARED)


class ExitReason(enum.IntEnum):
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_MMIO = 6
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_MEMORY_FAULT = 39


KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

KVM_INTERNAL_ERROR_EMULATION = 1  # kvm_run.internal.suberror

# KVM_HC_MAP_GPA_RANGE (include/uapi/linux/kvm_para.h, arch/x86/include/uapi/asm/kvm_para.h):
# the hypercall KVM_CAP_EXIT_HYPERCALL can turn into KVM_EXIT_HYPERCALL.
KVM_HC_MAP_GPA_RANGE = 12
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0

# Page-table levels (KVM numbering).
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
PT64_ROOT_MAX_LEVEL = 5


def vm_has_private_mem(vm_type: int) -> bool:
    return vm_type in PRIVATE_MEM_VM_TYPES


def vm_has_protected_state(vm_type: int) -> bool:
    return vm_type in PROTECTED_STATE_VM_TYPES


def nr_address_spaces(vm_type: int) -> int:
    """SMM (as_id 1) exists only for VMs without private memory (kvm-memslots.md §1.1)."""
    return 1 if vm_has_private_mem(vm_type) else KVM_MAX_NR_ADDRESS_SPACES


def flag_names(enum_cls: type[enum.IntFlag], value: int) -> list[str]:
    return list(_flag_names(enum_cls, value))


@functools.lru_cache(maxsize=1024)
def _flag_names(enum_cls: type[enum.IntFlag], value: int) -> tuple[str, ...]:
    # Iterating an enum costs tens of microseconds; a memslot answer names its flags.
    return tuple(m.name for m in enum_cls if m.name and value & m.value)

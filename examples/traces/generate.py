"""Writes the sample traces of this directory (run from the repository root:
`python examples/traces/generate.py`). The traces are synthetic: they follow how QEMU's KVM
memory listener turns memory-region changes into KVM_SET_USER_MEMORY_REGION calls (a change
is a delete of the old slot and a create of the new one; a freed slot id is the first one
reused; the SMM address space of a q35 machine mirrors RAM and adds SMRAM), printed in
QEMU's `kvm_set_user_memory` trace format. See README.md for what each one shows."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
GiB = 1 << 30
RAM_HVA = 0x7F2A00000000  # pc.ram, as QEMU's mmap might place it
ROM_HVA = 0x7F2980000000  # pc.bios / option ROMs
VRAM_HVA = 0x7F2960000000  # vga.vram (16 MiB)
DIMM_HVA = 0x7F2800000000  # a hot-plugged pc-dimm


class Listener:
    """QEMU's kvm memory listener, reduced to what the trace shows."""

    def __init__(self, style: str, pid: int = 4242) -> None:
        self.style = style  # "addrspace" (newer QEMU) or "slot" (older: as_id << 16 | id)
        self.pid = pid
        self.slots: list[dict[int, tuple[int, int, int, int]]] = [{}, {}]
        self.lines: list[str] = []
        self.t = 0

    def comment(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def _emit(self, as_id: int, sid: int, flags: int, gpa: int, size: int, ua: int, ret: int):
        self.t += 137
        prefix = f"{self.pid}@{1733130000 + self.t // 1000000}.{self.t % 1000000:06d}:"
        fields = f"flags=0x{flags:x} gpa=0x{gpa:x} size=0x{size:x} ua=0x{ua:x}"
        if self.style == "slot":
            self.lines.append(
                f"{prefix}kvm_set_user_memory Slot#{as_id << 16 | sid} {fields} ret={ret}"
            )
        else:
            self.lines.append(
                f"{prefix}kvm_set_user_memory AddrSpace#{as_id} Slot#{sid} {fields} "
                f"guest_memfd=-1 guest_memfd_offset=0x0 ret={ret}"
            )

    def add(self, gpa: int, size: int, ua: int, flags: int = 0, as_id: int = 0) -> None:
        sid = next(i for i in range(32764) if i not in self.slots[as_id])
        self.slots[as_id][sid] = (gpa, size, ua, flags)
        self._emit(as_id, sid, flags, gpa, size, ua, 0)

    def delete(self, gpa: int, as_id: int = 0) -> None:
        sid = next(i for i, s in self.slots[as_id].items() if s[0] == gpa)
        g, _size, ua, flags = self.slots[as_id].pop(sid)
        self._emit(as_id, sid, flags, g, 0, ua, 0)

    def both(self, gpa: int, size: int, ua: int, flags: int = 0) -> None:
        """A region every address space sees (RAM seen from SMM too)."""
        self.add(gpa, size, ua, flags, 0)
        self.add(gpa, size, ua, flags, 1)

    def both_delete(self, gpa: int) -> None:
        self.delete(gpa, 0)
        self.delete(gpa, 1)

    def write(self, name: str, header: str) -> None:
        body = "\n".join(self.lines) + "\n"
        (HERE / name).write_text("".join(f"# {h}\n" for h in header.splitlines()) + body)


def pc_boot_smm() -> None:
    """q35, 128 MiB, SMM on: RAM in both address spaces, SMRAM only in SMM, BIOS shadowing
    through the PAM registers, PCI BAR sizing, the VGA window, and TSEG being closed."""
    q = Listener("addrspace")
    q.comment("machine init: RAM below the VGA hole and above 1 MiB, the BIOS ROM")
    q.both(0x0, 0xA0000, RAM_HVA)
    q.both(0x100000, 128 * MiB - MiB, RAM_HVA + 0x100000)
    q.both(0xFFFC0000, 0x40000, ROM_HVA, flags=0x2)
    q.both(0xC0000, 0x40000, ROM_HVA + 0x40000, flags=0x2)
    q.comment("SMRAM: in SMM, 0xa0000-0xbffff is RAM")
    q.add(0xA0000, 0x20000, RAM_HVA + 0xA0000, as_id=1)
    # SeaBIOS programs the 13 PAM segments one by one, twice (shadow, then lock read-only):
    # each write splits or merges the 0xc0000-0xfffff window's slots.
    segments = [(0xC0000 + i * 0x4000, 0x4000) for i in range(12)] + [(0xF0000, 0x10000)]
    for rnd, flags in ((1, 0x0), (2, 0x2)):
        q.comment(f"PAM pass {rnd}: segments become {'RAM' if flags == 0 else 'read-only RAM'}")
        q.both_delete(0xC0000)
        for gpa, size in segments:
            q.both(gpa, size, RAM_HVA + gpa, flags)
        for _ in range(3):  # the BIOS re-reads and rewrites the PAM registers
            for gpa, size in segments:
                q.both_delete(gpa)
                q.both(gpa, size, RAM_HVA + gpa, flags)
        for gpa, _ in segments:
            q.both_delete(gpa)
        q.both(0xC0000, 0x40000, RAM_HVA + 0xC0000, flags)
    q.comment("PCI enumeration: every memory BAR is sized (decode off) then placed")
    bars = [(0xFD000000, 16 * MiB, VRAM_HVA), (0xFEBF0000, 0x1000, VRAM_HVA + 16 * MiB)]
    q.add(0xFD000000, 16 * MiB, VRAM_HVA, flags=0x0)
    for _ in range(6):
        for gpa, _size, _ua in bars[:1]:
            q.delete(gpa)
            q.add(gpa, 16 * MiB, VRAM_HVA)
    q.comment("the VGA window: the guest switches between text and graphics modes")
    for i in range(40):
        q.add(0xA0000, 0x10000, VRAM_HVA, flags=0x1 if i % 2 else 0x0)
        q.delete(0xA0000)
    q.comment("framebuffer dirty logging on for the display, off at shutdown of the console")
    q.delete(0xFD000000)
    q.add(0xFD000000, 16 * MiB, VRAM_HVA, flags=0x1)
    q.comment("SMM: TSEG closed and locked: SMRAM leaves the SMM address space's window")
    q.delete(0xA0000, as_id=1)
    q.add(0xA0000, 0x20000, RAM_HVA + 0xA0000, as_id=1)
    q.write(
        "pc-boot-smm.trace",
        "A q35 PC booting SeaBIOS with SMM (QEMU newer format: AddrSpace#A Slot#N).\n"
        "Synthetic, written by vkmmu's examples/traces/generate.py; see README.md.",
    )


def vga_toggle() -> None:
    """Older QEMU format; the legacy VGA window mapped and unmapped while RAM stays."""
    q = Listener("slot", pid=777)
    q.comment("boot: 1 GiB of RAM in both address spaces (SMM slots are Slot#65536+N)")
    q.both(0x0, 0xA0000, RAM_HVA)
    q.both(0x100000, GiB - MiB, RAM_HVA + 0x100000)
    q.add(0xFD000000, 16 * MiB, VRAM_HVA, flags=0x1)
    q.comment("the guest flips the VGA window (vga.vram at 0xa0000) in and out 100 times")
    for _ in range(100):
        q.add(0xA0000, 0x20000, VRAM_HVA)
        q.delete(0xA0000)
    q.write(
        "vga-toggle.trace",
        "The VGA window at 0xa0000 toggling (QEMU older format: Slot#N, N = as_id << 16 | id).\n"
        "Synthetic, written by vkmmu's examples/traces/generate.py; see README.md.",
    )


def pci_bar_remap() -> None:
    q = Listener("addrspace", pid=9001)
    q.comment("boot: 4 GiB of RAM (3 GiB below 4G, 1 GiB above) and a 256 MiB BAR")
    q.add(0x0, 0xA0000, RAM_HVA)
    q.add(0x100000, 3 * GiB - MiB, RAM_HVA + 0x100000)
    q.add(0x100000000, GiB, RAM_HVA + 3 * GiB)
    q.add(0xE0000000, 256 * MiB, VRAM_HVA)
    q.comment("the guest OS reassigns the BAR: decode off, new base, decode on (a move)")
    for base in (0xC0000000, 0xD0000000, 0xE0000000, 0x800000000):
        q.delete(q.slots[0][3][0])
        q.add(base, 256 * MiB, VRAM_HVA)
    q.comment("a bad placement QEMU itself would never make: overlaps RAM, EEXIST (-17)")
    q._emit(0, 4, 0, 0x40000000, 256 * MiB, VRAM_HVA, -17)
    q.write(
        "pci-bar-remap.trace",
        "A PCI BAR being remapped by the guest OS, plus one call KVM refuses (ret=-17).\n"
        "Synthetic, written by vkmmu's examples/traces/generate.py; see README.md.",
    )


def memory_hot_unplug() -> None:
    q = Listener("addrspace", pid=31337)
    q.comment("boot: 2 GiB of RAM, then two 1 GiB pc-dimms hot-plugged above 4G")
    q.add(0x0, 0xA0000, RAM_HVA)
    q.add(0x100000, 2 * GiB - MiB, RAM_HVA + 0x100000)
    q.add(0x100000000, GiB, DIMM_HVA)
    q.add(0x140000000, GiB, DIMM_HVA + GiB)
    q.comment("device_del dimm1: the guest offlines it, QEMU removes its memory region")
    q.delete(0x140000000)
    q.comment("device_del dimm0")
    q.delete(0x100000000)
    q.write(
        "memory-hot-unplug.trace",
        "Two pc-dimms hot-plugged, then unplugged.\n"
        "Synthetic, written by vkmmu's examples/traces/generate.py; see README.md.",
    )


if __name__ == "__main__":
    pc_boot_smm()
    vga_toggle()
    pci_bar_remap()
    memory_hot_unplug()

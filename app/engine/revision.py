"""Behaviour revisions of the engine.

A VM keeps the revision it was created under, so that its journal replays to the state it
had; new VMs get the latest. The service journals the revision with the VM's creation; a
creation record without one is revision 1 (docs/engine.md "Behaviour revisions").

1. A fault under a huge leaf it may not use zapped the leaf and mapped a fresh table.
2. It splits the leaf instead (kvm_tdp_mmu_map → tdp_mmu_split_huge_page), and the 4K
   children of any split are executable under host.nx_huge_pages (make_small_spte).
3. Re-arming dirty logging (GET_DIRTY_LOG, CLEAR_DIRTY_LOG) with KVM_DIRTY_LOG_INITIALLY_SET
   write-protects the huge leaves over each 64-page word's first and last page, W and
   MMU-writable, with PML too; the masked pass touches 4K leaves only
   (kvm_arch_mmu_enable_log_dirty_pt_masked).
"""

from __future__ import annotations

ENGINE_REV = 3
ENGINE_REVS = frozenset({1, 2, 3})

"""Behaviour revisions of the engine.

A VM keeps the revision it was created under, so that its journal replays to the state it
had; new VMs get the latest. The service journals the revision with the VM's creation; a
creation record without one is revision 1 (docs/engine.md "Behaviour revisions").

1. A fault under a huge leaf it may not use zapped the leaf and mapped a fresh table.
2. It splits the leaf instead (kvm_tdp_mmu_map → tdp_mmu_split_huge_page), and the 4K
   children of any split are executable under host.nx_huge_pages (make_small_spte).
"""

from __future__ import annotations

ENGINE_REV = 2
ENGINE_REVS = frozenset({1, 2})

#!/usr/bin/env bash
# The README's five-minute tour. `make readme-tour` runs it against a fresh server and
# writes each block with its real output into README.md; tests/deploy/test_tour.py runs it
# again and compares. Blocks are separated by blank lines; a block's leading `# ` lines are
# the README's prose. Needs curl and jq. API defaults to a local `make run`.
set -euo pipefail

# Where the server is, and two helpers: `post`/`put` send JSON.
API=${API:-http://127.0.0.1:8000/v1}
post() { curl -sf -XPOST "$API$1" -H 'content-type: application/json' -d "$2"; }
put() { curl -sf -XPUT "$API$1" -H 'content-type: application/json' -d "$2"; }

# Create a VM (`KVM_CREATE_VM`) and keep its id.
VM=$(post /vms '{"name": "tour", "vm_type": "KVM_X86_DEFAULT_VM"}' | jq -r .id)
curl -s "$API/vms/$VM" | jq -c '{id, vm_type_name, slot_zap_all_applies, zap_policy}'

# Two 4 MiB memslots side by side (`KVM_SET_USER_MEMORY_REGION2`).
put /vms/$VM/memslots/0 '{"guest_phys_addr": "0x0", "memory_size": "0x400000",
                          "userspace_addr": "0x7f0000000000"}' | jq -c '{change, memslot: .memslot | {slot, base_gfn, npages}}'
put /vms/$VM/memslots/1 '{"guest_phys_addr": "0x400000", "memory_size": "0x400000",
                          "userspace_addr": "0x7f0000400000"}' | jq -c '{change, memslot: .memslot | {slot, base_gfn, npages}}'

# The guest writes all 8 MiB: 2048 EPT violations, 2048 4 KiB SPTEs built.
post /vms/$VM/vcpus/0/accesses '{"gpa": "0x0", "size": "0x800000", "access": "write"}' | jq -c

# Delete slot 1 with `KVM_X86_QUIRK_SLOT_ZAP_ALL` in force (the default): KVM zaps *everything*
# ("fast zap": every root invalidated), slot 0's 1024 SPTEs included.
curl -s -XDELETE "$API/vms/$VM/memslots/1" | jq -c '.zap | {path, slot, slot_zap_all, sptes_zapped_total, roots_invalidated, tables_freed}'

# So the guest faults slot 0 in again: 1024 refaults.
post /vms/$VM/vcpus/0/accesses '{"gpa": "0x0", "size": "0x400000", "access": "write"}' | jq -c '{mapped, refaults}'

# Turn the quirk off (`KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2)` with bit 7 = 128); the answer
# is the VM's quirk state after the call.
post /vms/$VM/enable-cap '{"cap": "KVM_CAP_DISABLE_QUIRKS2", "args": [128]}' |
  jq -c '.quirks.quirks[] | select(.name == "KVM_X86_QUIRK_SLOT_ZAP_ALL")'

# Same again: slot 1 back and faulted in (its GFNs were zapped by the fast zap, so these are
# refaults too), then deleted. Now KVM zaps only slot 1's leaf SPTEs...
put /vms/$VM/memslots/1 '{"guest_phys_addr": "0x400000", "memory_size": "0x400000",
                          "userspace_addr": "0x7f0000400000"}' | jq -c .change
post /vms/$VM/vcpus/0/accesses '{"gpa": "0x400000", "size": "0x400000", "access": "write"}' | jq -c '{mapped, refaults}'
curl -s -XDELETE "$API/vms/$VM/memslots/1" | jq -c '.zap | {path, slot, slot_zap_all, sptes_zapped_total, roots_invalidated, tlb_flushes}'

# ... and slot 0 stays mapped: touching it again faults nothing in, no refault.
post /vms/$VM/vcpus/0/accesses '{"gpa": "0x0", "size": "0x400000", "access": "write"}' | jq -c '{mapped, spurious, refaults}'

# The zap events, newest first, and the VM's stats (the kernel's names plus vkmmu's counts).
curl -s "$API/vms/$VM/zaps" | jq -c '.items[] | {seq, path, cause, slot, gfn_start, gfn_end, sptes_zapped_total}'
curl -s "$API/vms/$VM/stats" | jq -c '{pages_4k, pf_fixed, refaults, zaps_all_fast, zaps_slot_leafs, zaps_total_sptes, remote_tlb_flush}'

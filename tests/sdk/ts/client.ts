// The main flow of a TypeScript client, typed by openapi-typescript's output (schema.d.ts,
// generated into build/ by tests/sdk/test_typescript_types.py). `tsc --strict` must accept it.
import type { components, operations } from "./build/schema";

type S = components["schemas"];
type Json<Op extends keyof operations> = operations[Op] extends {
  responses: { 200: { content: { "application/json": infer T } } };
}
  ? T
  : operations[Op] extends { responses: { 201: { content: { "application/json": infer T } } } }
    ? T
    : never;

async function call<T>(base: string, method: string, path: string, body?: unknown): Promise<T> {
  const r = await fetch(base + path, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) {
    const problem = (await r.json()) as S["Problem"];
    throw new Error(`${problem.status} ${problem.errno_name ?? ""}: ${problem.detail}`);
  }
  return (await r.json()) as T;
}

export async function mainFlow(base: string): Promise<number> {
  const create: S["VmCreate"] = { vm_type: "KVM_X86_DEFAULT_VM", vcpus: 1 };
  const vm = await call<Json<"vms_create">>(base, "POST", "/v1/vms", create);
  const region: S["MemoryRegion"] = {
    guest_phys_addr: 0,
    memory_size: "0x200000",
    userspace_addr: "0x7f0000000000",
  };
  const change = await call<S["MemslotChange"]>(base, "PUT", `/v1/vms/${vm.id}/memslots/0`, region);
  const size: number = change.memslot?.memory_size ?? 0;
  const access: S["Access"] = { gpa: 0, size: 8192, access: "write" };
  const done = await call<Json<"guest_access">>(base, "POST", `/v1/vms/${vm.id}/vcpus/0/accesses`, access);
  const mapped: number = done.mapped + done.levels["4k"];
  if (done.exit && done.exit.reason === "KVM_EXIT_MMIO") {
    const isWrite: boolean = done.exit.is_write;
    console.log(isWrite);
  }
  const deleted = await call<Json<"memslots_delete">>(base, "DELETE", `/v1/vms/${vm.id}/memslots/0`);
  const zap: S["ZapEvent"] | null = deleted.zap;
  const zapped: number = zap ? zap.sptes_zapped_total + zap.sptes_zapped.direct["4k"] : 0;
  const when: string = zap ? zap.at : "";
  const stats = await call<Json<"stats_get">>(base, "GET", `/v1/vms/${vm.id}/stats`);
  const pages: number = stats.pages_4k + stats.remote_tlb_flush;
  const walk = await call<Json<"translate_get">>(base, "GET", `/v1/vms/${vm.id}/translate?gpa=0`);
  const hva: number | null = walk.roots[0]?.leaf?.hva ?? null;
  const zaps = await call<Json<"zaps_list">>(base, "GET", `/v1/vms/${vm.id}/zaps?cause=memslot_delete`);
  const paths: string[] = zaps.items.map((e) => e.path);
  console.log(when, hva, paths.length);
  return size + mapped + zapped + pages;
}

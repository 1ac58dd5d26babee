// Measures the pure decision code of the filter inside V8 (Node), without Envoy:
//   cargo build --release --target wasm32-wasip1 -p gateway-filter --features bench-exports
//   node bench/wasm_micro.mjs target/wasm32-wasip1/release/gateway_filter.wasm
// Every host import is a stub; the exported benchmark functions make no host calls.
import { readFileSync } from "node:fs";

const path = process.argv[2] ?? "target/wasm32-wasip1/release/gateway_filter.wasm";
const module = new WebAssembly.Module(readFileSync(path));
const imports = {};
for (const imp of WebAssembly.Module.imports(module)) {
  imports[imp.module] ??= {};
  if (imp.kind === "function") imports[imp.module][imp.name] = () => 0;
}
const instance = new WebAssembly.Instance(module, imports);
const { gw_bench_decide, gw_bench_verify, _initialize } = instance.exports;
if (_initialize) _initialize();
if (!gw_bench_decide) throw new Error("build with --features bench-exports");

gw_bench_decide(20000); // warm up (tier-up)
for (const n of [100000, 100000]) {
  const t = process.hrtime.bigint();
  const sum = gw_bench_decide(n);
  const us = Number(process.hrtime.bigint() - t) / 1000 / n;
  console.log(`decide in V8: ${us.toFixed(2)} us per call (checksum ${sum})`);
}

// One uncached verification per algorithm (parse, signature, claims), as a cache miss pays it.
const algs = ["HS256", "RS256", "PS256", "ES256", "ES384", "EdDSA"];
for (const [i, alg] of algs.entries()) {
  gw_bench_verify(i, 20); // warm up
  const n = alg.startsWith("HS") ? 20000 : 400;
  const t = process.hrtime.bigint();
  const ok = gw_bench_verify(i, n);
  const us = Number(process.hrtime.bigint() - t) / 1000 / n;
  if (ok !== n) throw new Error(`${alg}: ${ok} of ${n} verified`);
  console.log(`verify ${alg} in V8: ${us.toFixed(1)} us per token (uncached)`);
}

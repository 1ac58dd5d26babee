//! Emulated proxy-wasm hosts: the *built* module (`build/gateway_filter.wasm`) run through the
//! request path under a chosen host's function table and semantics, in wasmi. For the hosts
//! this machine cannot run (Kong's ngx_wasm_module, APISIX's wasm-nginx-module) and for Envoy
//! as a control. `make test` runs it after the build.
//!
//! Each host offers exactly the functions of its table (`tests/hosts/*.json`, read from its
//! source at the commit the file names): an import the table lacks fails the link, a function
//! the table lists as a trapping stub traps, one it lists as answering Unimplemented does so.
//! On top, the semantics read from the same sources (each stated where it is emulated):
//! - Kong (src/common/proxy_wasm/ngx_proxy_wasm_host.c): `proxy_set_effective_context` does
//!   nothing; an unknown foreign function traps; a call's answer is delivered on the context
//!   that dispatched it.
//! - APISIX (src/http/ngx_http_wasm_api.c, ngx_http_wasm_call.c, ngx_http_wasm_module.c): no
//!   shared data, ticks, time or foreign functions (Unimplemented); `set_effective_context` and
//!   `continue_stream` do nothing; one call per request; after a call's answer the request goes
//!   on by itself unless a local reply was sent; a `Pause` without a call of the request's own
//!   is mishandled (counted as a violation here); `on_log` is never called.
//! - Envoy (proxy-wasm-cpp-host): everything, `set_effective_context` switches.
//!
//! The cases: a public route, a valid token (its own lookup answered clean), a revoked token, a
//! store failure, a bad token, a route limit, the canary, and two requests with one token. The
//! rule checked above all: no request goes upstream without its own token's lookup answered
//! clean (on a host where only the dispatching context can be resumed).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use gateway_filter::canary::{ROUTE_HEADER, ROUTE_VALUE};
use hmac::{Hmac, Mac};
use wasmi::{Caller, Engine, Extern, Func, Instance, Linker, Module, Store, Val};

type R<T> = Result<T, String>;

const SECRET: &str = "hostemu-secret-hostemu-secret-hostemu";
const ROOT: i32 = 1;
const CLEAN: &str = r#"{"MGET":[null,null,null]}"#;
const BLACKLISTED: &str = r#"{"MGET":["1",null,null]}"#;

/// What a host is, beyond its function table.
#[derive(Debug, Clone)]
struct Profile {
    name: &'static str,
    table: &'static str,
    /// `set_effective_context` switches the context later calls act on.
    switches_context: bool,
    /// The request goes on by itself after a call's answer (APISIX).
    continues_after_call: bool,
    /// Calls allowed per request at once.
    calls_per_request: usize,
    /// What `proxy_get_property("xds.node")` answers at the root: Ok, or this status.
    xds_node: Option<i32>,
    /// An unknown foreign function traps (Kong) or answers this status.
    foreign_traps: bool,
    on_log: bool,
    /// `set_shared_data` with cas 0 writes only a missing key, and a non-zero cas never creates
    /// one (Kong: `ngx_wa_shm_kv_set_locked` compares the cas with the node's, 0 for none);
    /// Envoy reads cas 0 as no check.
    cas_zero_creates: bool,
    /// A removed request header is only marked, and nginx's proxy module still sends it
    /// upstream (Kong: `ngx_http_wasm_headers.c` sets `hash = 0`; nginx's
    /// `ngx_http_proxy_create_request` does not skip such entries; seen in a real Kong).
    forwards_removed_headers: bool,
}

fn profiles() -> Vec<Profile> {
    vec![
        Profile {
            name: "Envoy (proxy-wasm-cpp-host)",
            table: "envoy-proxy-wasm-cpp-host.json",
            switches_context: true,
            continues_after_call: false,
            calls_per_request: usize::MAX,
            xds_node: None,
            foreign_traps: false,
            on_log: true,
            cas_zero_creates: false,
            forwards_removed_headers: false,
        },
        Profile {
            name: "Kong ngx_wasm_module",
            table: "kong-ngx_wasm_module.json",
            switches_context: false,
            continues_after_call: false,
            calls_per_request: usize::MAX,
            // "scoped properties outside of a request" -> InternalFailure (properties.c).
            xds_node: Some(10),
            foreign_traps: true,
            on_log: true,
            cas_zero_creates: true,
            forwards_removed_headers: true,
        },
        Profile {
            name: "APISIX wasm-nginx-module",
            table: "apisix-wasm-nginx-module.json",
            switches_context: false,
            continues_after_call: true,
            calls_per_request: 1,
            // No request at the root: BadArgument (ngx_http_wasm_api.c, must_get_req).
            xds_node: Some(2),
            foreign_traps: false,
            on_log: false,
            cas_zero_creates: false,
            // Not read for APISIX (its removal goes through OpenResty); not assumed either way.
            forwards_removed_headers: true,
        },
    ]
}

/// A host function table (`tests/hosts/*.json`).
struct Table {
    env: HashSet<String>,
    traps: HashSet<String>,
    unimplemented: HashSet<String>,
    wasi: HashSet<String>,
    commit: String,
}

fn strings(v: &serde_json::Value, key: &str) -> HashSet<String> {
    v.get(key)
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn load_table(dir: &Path, file: &str) -> R<Table> {
    let text = std::fs::read_to_string(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    Ok(Table {
        env: strings(&v, "env"),
        traps: strings(&v, "traps"),
        unimplemented: strings(&v, "noop_return_unimplemented"),
        wasi: strings(&v, "wasi_snapshot_preview1"),
        commit: v
            .get("commit")
            .and_then(|c| c.as_str())
            .unwrap_or("?")
            .to_string(),
    })
}

#[derive(Debug, Default)]
struct Req {
    headers: Vec<(String, String)>,
    reply: Option<(i32, String)>,
    continued: bool,
    pending: usize,
    /// Answers of this request's own lookups: clean or not.
    answers: Vec<bool>,
    /// Headers the filter removed that the upstream still receives (see the profile).
    still_forwarded: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Call {
    token: i32,
    ctx: i32,
    path: String,
}

struct St {
    profile: Profile,
    table_unimplemented: HashSet<String>,
    current: i32,
    reqs: HashMap<i32, Req>,
    calls: Vec<Call>,
    answer: (i32, Vec<u8>),
    shared: HashMap<String, (Vec<u8>, u32)>,
    config: Vec<u8>,
    now_ns: u64,
    next_token: i32,
    logs: Vec<String>,
    violations: Vec<String>,
}

fn arg_i32(args: &[Val], i: usize) -> i32 {
    match args.get(i) {
        Some(Val::I32(v)) => *v,
        _ => 0,
    }
}

fn memory(caller: &Caller<'_, St>) -> R<wasmi::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err("no memory export".into()),
    }
}

fn read(caller: &Caller<'_, St>, ptr: i32, len: i32) -> R<Vec<u8>> {
    let m = memory(caller)?;
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    m.data(caller)
        .get(p..p.saturating_add(l))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "read out of bounds".to_string())
}

fn write(caller: &mut Caller<'_, St>, ptr: i32, bytes: &[u8]) -> R<()> {
    let m = memory(caller)?;
    let p = ptr as u32 as usize;
    m.data_mut(caller)
        .get_mut(p..p.saturating_add(bytes.len()))
        .ok_or_else(|| "write out of bounds".to_string())?
        .copy_from_slice(bytes);
    Ok(())
}

/// Copies `bytes` into memory the module allocates, and writes its address and size.
fn give(caller: &mut Caller<'_, St>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> R<()> {
    let alloc = match caller.get_export("proxy_on_memory_allocate") {
        Some(Extern::Func(f)) => f,
        _ => return Err("no proxy_on_memory_allocate".into()),
    };
    let mut out = [Val::I32(0)];
    alloc
        .call(&mut *caller, &[Val::I32(bytes.len() as i32)], &mut out)
        .map_err(|e| e.to_string())?;
    let ptr = match out.first() {
        Some(Val::I32(p)) => *p,
        _ => 0,
    };
    write(caller, ptr, bytes)?;
    write(caller, ret_ptr, &ptr.to_le_bytes())?;
    write(caller, ret_size, &(bytes.len() as u32).to_le_bytes())
}

fn pairs_encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

fn pairs_decode(bytes: &[u8]) -> Vec<(String, String)> {
    let word = |i: usize| {
        bytes
            .get(i..i + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes) as usize
    };
    let n = word(0);
    let mut sizes = Vec::new();
    for i in 0..n {
        sizes.push((word(4 + i * 8), word(8 + i * 8)));
    }
    let mut at = 4 + n * 8;
    let mut out = Vec::new();
    for (k, v) in sizes {
        let key = bytes.get(at..at + k).unwrap_or_default();
        at += k + 1;
        let value = bytes.get(at..at + v).unwrap_or_default();
        at += v + 1;
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    out
}

/// One host function: `name` with the module's arguments.
fn host(name: &str, caller: &mut Caller<'_, St>, args: &[Val]) -> R<i32> {
    let a = |i| arg_i32(args, i);
    let unimplemented = caller.data().table_unimplemented.contains(name);
    if unimplemented {
        return Ok(12);
    }
    let ctx = caller.data().current;
    match name {
        "proxy_log" => {
            let msg = String::from_utf8_lossy(&read(caller, a(1), a(2))?).into_owned();
            caller.data_mut().logs.push(msg);
            Ok(0)
        }
        "proxy_get_current_time_nanoseconds" => {
            let now = caller.data().now_ns;
            write(caller, a(0), &now.to_le_bytes())?;
            Ok(0)
        }
        "proxy_set_tick_period_milliseconds" | "proxy_set_property" => Ok(0),
        "proxy_get_property" => {
            let path = read(caller, a(0), a(1))?;
            let is_root = ctx == ROOT;
            let answer: Option<Vec<u8>> = match path.as_slice() {
                b"xds\0node" => match caller.data().profile.xds_node {
                    None => Some(b"\x0a\x04node".to_vec()),
                    Some(status) => return Ok(status),
                },
                b"source\0address" if !is_root => Some(b"10.0.0.5:40000".to_vec()),
                _ => None,
            };
            match answer {
                Some(bytes) => {
                    give(caller, &bytes, a(2), a(3))?;
                    Ok(0)
                }
                None => Ok(1),
            }
        }
        "proxy_get_buffer_bytes" => {
            let bytes = match a(0) {
                7 => caller.data().config.clone(),
                4 => caller.data().answer.1.clone(),
                6 => Vec::new(),
                _ => return Ok(1),
            };
            let start = a(1) as usize;
            let max = a(2) as u32 as usize;
            let slice: Vec<u8> = bytes.iter().skip(start).take(max).copied().collect();
            give(caller, &slice, a(3), a(4))?;
            Ok(0)
        }
        "proxy_get_header_map_pairs" => {
            let pairs = match a(0) {
                0 => caller
                    .data()
                    .reqs
                    .get(&ctx)
                    .map(|r| r.headers.clone())
                    .unwrap_or_default(),
                6 => vec![(":status".to_string(), caller.data().answer.0.to_string())],
                _ => Vec::new(),
            };
            give(caller, &pairs_encode(&pairs), a(1), a(2))?;
            Ok(0)
        }
        "proxy_get_header_map_value" => {
            let key = String::from_utf8_lossy(&read(caller, a(1), a(2))?).into_owned();
            let value = match a(0) {
                0 => caller
                    .data()
                    .reqs
                    .get(&ctx)
                    .and_then(|r| r.headers.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())),
                6 if key == ":status" => Some(caller.data().answer.0.to_string()),
                _ => None,
            };
            match value {
                Some(v) => {
                    give(caller, v.as_bytes(), a(3), a(4))?;
                    Ok(0)
                }
                None => Ok(1),
            }
        }
        "proxy_add_header_map_value" | "proxy_replace_header_map_value" => {
            let key = String::from_utf8_lossy(&read(caller, a(1), a(2))?).into_owned();
            let value = String::from_utf8_lossy(&read(caller, a(3), a(4))?).into_owned();
            let marks = caller.data().profile.forwards_removed_headers;
            if a(0) == 0 {
                if let Some(r) = caller.data_mut().reqs.get_mut(&ctx) {
                    if name == "proxy_replace_header_map_value" {
                        remove_header(r, &key, marks);
                    }
                    r.headers.push((key, value));
                }
            }
            Ok(0)
        }
        "proxy_remove_header_map_value" => {
            let key = String::from_utf8_lossy(&read(caller, a(1), a(2))?).into_owned();
            let marks = caller.data().profile.forwards_removed_headers;
            if a(0) == 0 {
                if let Some(r) = caller.data_mut().reqs.get_mut(&ctx) {
                    remove_header(r, &key, marks);
                }
            }
            Ok(0)
        }
        "proxy_set_header_map_pairs" => {
            let pairs = pairs_decode(&read(caller, a(1), a(2))?);
            if a(0) == 0 {
                if let Some(r) = caller.data_mut().reqs.get_mut(&ctx) {
                    r.headers = pairs;
                }
            }
            Ok(0)
        }
        "proxy_continue_stream" => {
            let st = caller.data_mut();
            if st.profile.continues_after_call {
                return Ok(0); // APISIX: a no-op
            }
            if let Some(r) = st.reqs.get_mut(&ctx) {
                r.continued = true;
            }
            Ok(0)
        }
        "proxy_send_local_response" => {
            let body = String::from_utf8_lossy(&read(caller, a(3), a(4))?).into_owned();
            let st = caller.data_mut();
            if let Some(r) = st.reqs.get_mut(&ctx) {
                if r.reply.is_some() || r.continued {
                    st.violations
                        .push(format!("context {ctx}: a second exit (local reply)"));
                }
                r.reply = Some((a(0), body));
            }
            Ok(0)
        }
        "proxy_get_shared_data" => {
            let key = String::from_utf8_lossy(&read(caller, a(0), a(1))?).into_owned();
            let found = caller.data().shared.get(&key).cloned();
            match found {
                Some((value, cas)) => {
                    give(caller, &value, a(2), a(3))?;
                    write(caller, a(4), &cas.to_le_bytes())?;
                    Ok(0)
                }
                None => Ok(1),
            }
        }
        "proxy_set_shared_data" => {
            let key = String::from_utf8_lossy(&read(caller, a(0), a(1))?).into_owned();
            let value = read(caller, a(2), a(3))?;
            let cas = a(4) as u32;
            let strict = caller.data().profile.cas_zero_creates;
            let shared = &mut caller.data_mut().shared;
            let next = match shared.get(&key) {
                Some((_, current)) if (cas != 0 || strict) && *current != cas => return Ok(9),
                None if strict && cas != 0 => return Ok(9),
                Some((_, current)) => current + 1,
                None => 1,
            };
            shared.insert(key, (value, next));
            Ok(0)
        }
        "proxy_http_call" => {
            let headers = pairs_decode(&read(caller, a(2), a(3))?);
            let st = caller.data_mut();
            let own = st.calls.iter().filter(|c| c.ctx == ctx).count();
            if ctx == ROOT && st.profile.continues_after_call {
                return Ok(10); // APISIX: calls only during a request
            }
            if own >= st.profile.calls_per_request {
                return Ok(10);
            }
            st.next_token += 1;
            let token = st.next_token;
            let path = headers
                .iter()
                .find(|(k, _)| k == ":path")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            st.calls.push(Call { token, ctx, path });
            if let Some(r) = st.reqs.get_mut(&ctx) {
                r.pending += 1;
            }
            write(caller, a(9), &token.to_le_bytes())?;
            Ok(0)
        }
        "proxy_define_metric" => {
            write(caller, a(3), &7u32.to_le_bytes())?;
            Ok(0)
        }
        "proxy_increment_metric" | "proxy_record_metric" => Ok(0),
        "proxy_set_effective_context" => {
            let st = caller.data_mut();
            if st.profile.switches_context {
                st.current = a(0);
            }
            Ok(0)
        }
        "proxy_call_foreign_function" => {
            let fname = String::from_utf8_lossy(&read(caller, a(0), a(1))?).into_owned();
            if caller.data().profile.foreign_traps {
                return Err(format!("host trap: unknown foreign function {fname}"));
            }
            Ok(if fname == "clear_route_cache" { 0 } else { 1 })
        }
        "proxy_done" | "proxy_close_stream" | "proxy_get_status" => Ok(0),
        _ => Ok(12),
    }
}

fn wasi(name: &str, caller: &mut Caller<'_, St>, args: &[Val]) -> R<i32> {
    let a = |i| arg_i32(args, i);
    match name {
        "random_get" => {
            let bytes: Vec<u8> = (0..a(1))
                .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
                .collect();
            write(caller, a(0), &bytes)?;
            Ok(0)
        }
        "clock_time_get" => {
            let now = caller.data().now_ns;
            write(caller, a(2), &now.to_le_bytes())?;
            Ok(0)
        }
        "environ_sizes_get" => {
            write(caller, a(0), &0u32.to_le_bytes())?;
            write(caller, a(1), &0u32.to_le_bytes())?;
            Ok(0)
        }
        "environ_get" => Ok(0),
        "fd_write" => {
            let iovs = read(caller, a(1), a(2).saturating_mul(8))?;
            let total: u32 = iovs
                .chunks(8)
                .filter_map(|c| c.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok()))
                .map(u32::from_le_bytes)
                .sum();
            write(caller, a(3), &total.to_le_bytes())?;
            Ok(0)
        }
        "proc_exit" => Err("proc_exit".into()),
        _ => Ok(52),
    }
}

struct Vm {
    store: Store<St>,
    instance: Instance,
}

impl Vm {
    fn new(wasm: &[u8], profile: &Profile, table: &Table, config: &str) -> R<Vm> {
        Vm::with_shared(wasm, profile, table, config, HashMap::new())
    }

    /// A VM that starts on a shared-data zone other VMs (workers) already wrote.
    fn with_shared(
        wasm: &[u8],
        profile: &Profile,
        table: &Table,
        config: &str,
        shared: HashMap<String, (Vec<u8>, u32)>,
    ) -> R<Vm> {
        let engine = Engine::default();
        let module = Module::new(&engine, wasm).map_err(|e| e.to_string())?;
        let mut linker = <Linker<St>>::new(&engine);
        let mut missing = Vec::new();
        for import in module.imports() {
            let (m, name) = (import.module().to_string(), import.name().to_string());
            let Some(ty) = import.ty().func().cloned() else {
                continue;
            };
            let defined = match m.as_str() {
                "env" => table.env.contains(&name),
                "wasi_snapshot_preview1" => table.wasi.contains(&name),
                _ => false,
            };
            if !defined {
                missing.push(format!("{m}.{name}"));
                continue;
            }
            let traps = m == "env" && table.traps.contains(&name);
            let results = ty.results().len();
            let (module_name, func_name) = (m.clone(), name.clone());
            linker
                .func_new(&module_name, &func_name, ty, move |mut caller, args, out| {
                    if traps {
                        return Err(wasmi::Error::new(format!(
                            "host trap (function not yet implemented): {name}"
                        )));
                    }
                    let status = if m == "env" {
                        host(&name, &mut caller, args)
                    } else {
                        wasi(&name, &mut caller, args)
                    }
                    .map_err(wasmi::Error::new)?;
                    if results > 0 {
                        if let Some(slot) = out.get_mut(0) {
                            *slot = Val::I32(status);
                        }
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())?;
        }
        if !missing.is_empty() {
            return Err(format!(
                "the module does not link: {} not defined",
                missing.join(", ")
            ));
        }
        let st = St {
            profile: profile.clone(),
            table_unimplemented: table.unimplemented.clone(),
            current: ROOT,
            reqs: HashMap::new(),
            calls: Vec::new(),
            answer: (200, Vec::new()),
            shared,
            config: config.as_bytes().to_vec(),
            now_ns: 1_800_000_000_000_000_000,
            next_token: 100,
            logs: Vec::new(),
            violations: Vec::new(),
        };
        let mut store = Store::new(&engine, st);
        let instance = linker
            .instantiate_and_start(&mut store, &module)
            .map_err(|e| e.to_string())?;
        let mut vm = Vm { store, instance };
        if vm.func("_initialize").is_some() {
            vm.call("_initialize", &[])?;
        }
        vm.call("proxy_on_context_create", &[ROOT, 0])?;
        vm.call("proxy_on_vm_start", &[ROOT, 0])?;
        let ok = vm.call("proxy_on_configure", &[ROOT, config.len() as i32])?;
        if ok != 1 {
            return Err(format!(
                "on_configure refused the configuration: {:?}",
                vm.store.data().logs
            ));
        }
        Ok(vm)
    }

    fn func(&self, name: &str) -> Option<Func> {
        self.instance.get_func(&self.store, name)
    }

    fn call(&mut self, name: &str, args: &[i32]) -> R<i32> {
        let f = self.func(name).ok_or_else(|| format!("no export {name}"))?;
        let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
        let n = f.ty(&self.store).results().len();
        let mut out = vec![Val::I32(0); n];
        if let Err(e) = f.call(&mut self.store, &params, &mut out) {
            let last = self.store.data().logs.last().cloned().unwrap_or_default();
            return Err(format!("{name}: {e} (last log line: {last})"));
        }
        Ok(match out.first() {
            Some(Val::I32(v)) => *v,
            _ => 0,
        })
    }

    /// A GET arrives on context `ctx`: the action the module returned (0 continue).
    fn request(&mut self, ctx: i32, path: &str, token: Option<&str>) -> R<i32> {
        self.request_method(ctx, "GET", path, token)
    }

    fn request_method(&mut self, ctx: i32, method: &str, path: &str, token: Option<&str>) -> R<i32> {
        self.request_with(ctx, method, path, token, &[])
    }

    fn request_with(
        &mut self,
        ctx: i32,
        method: &str,
        path: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
    ) -> R<i32> {
        let mut headers = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
            (":authority".to_string(), "gw".to_string()),
        ];
        if let Some(t) = token {
            headers.push(("authorization".to_string(), format!("Bearer {t}")));
        }
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let n = headers.len() as i32;
        self.store.data_mut().reqs.insert(
            ctx,
            Req {
                headers,
                ..Req::default()
            },
        );
        self.call("proxy_on_context_create", &[ctx, ROOT])?;
        self.store.data_mut().current = ctx;
        let action = self.call("proxy_on_request_headers", &[ctx, n, 1])?;
        let st = self.store.data_mut();
        if let Some(r) = st.reqs.get_mut(&ctx) {
            if action == 0 && r.reply.is_none() {
                r.continued = true;
            }
            if action == 1 && r.reply.is_none() && r.pending == 0 && !st.profile.switches_context {
                st.violations.push(format!(
                    "context {ctx}: paused without a call of its own (on {}, nothing but its own call's answer can resume it)",
                    st.profile.name
                ));
            }
        }
        Ok(action)
    }

    /// The answer to call `token` (a webdis reply is wrapped in the call's JSONP callback).
    fn answer(&mut self, token: i32, status: i32, json: &str) -> R<()> {
        let call = self
            .store
            .data()
            .calls
            .iter()
            .find(|c| c.token == token)
            .cloned()
            .ok_or("no such call")?;
        let body = match call.path.split_once("?jsonp=") {
            Some((_, cb)) if status == 200 => format!("{cb}({json})"),
            _ => json.to_string(),
        };
        let clean = status == 200 && json == CLEAN;
        let st = self.store.data_mut();
        st.answer = (status, body.clone().into_bytes());
        st.current = call.ctx;
        if let Some(r) = st.reqs.get_mut(&call.ctx) {
            r.pending = r.pending.saturating_sub(1);
            r.answers.push(clean);
        }
        st.calls.retain(|c| c.token != token);
        self.call(
            "proxy_on_http_call_response",
            &[call.ctx, token, 1, body.len() as i32, 0],
        )?;
        let st = self.store.data_mut();
        if st.profile.continues_after_call {
            if let Some(r) = st.reqs.get_mut(&call.ctx) {
                if r.reply.is_none() && r.pending == 0 {
                    r.continued = true; // APISIX goes on by itself
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self, ctx: i32) -> R<()> {
        if self.store.data().profile.on_log {
            self.store.data_mut().current = ctx;
            self.call("proxy_on_log", &[ctx])?;
        }
        self.call("proxy_on_done", &[ctx])?;
        self.call("proxy_on_delete", &[ctx])?;
        Ok(())
    }

    fn req(&self, ctx: i32) -> &Req {
        static EMPTY: std::sync::OnceLock<Req> = std::sync::OnceLock::new();
        self.store
            .data()
            .reqs
            .get(&ctx)
            .unwrap_or_else(|| EMPTY.get_or_init(Req::default))
    }

    fn calls_of(&self, ctx: i32) -> Vec<i32> {
        self.store
            .data()
            .calls
            .iter()
            .filter(|c| c.ctx == ctx)
            .map(|c| c.token)
            .collect()
    }

    fn status(&self, ctx: i32) -> Option<i32> {
        self.req(ctx).reply.as_ref().map(|r| r.0)
    }

    fn header(&self, ctx: i32, name: &str) -> Option<String> {
        self.req(ctx)
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

/// Removes a request header (names compare without case, as every host does); where the host
/// only marks it, the upstream still gets it.
fn remove_header(r: &mut Req, key: &str, marks: bool) {
    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut r.headers)
        .into_iter()
        .partition(|(k, _)| k.eq_ignore_ascii_case(key));
    r.headers = kept;
    if marks {
        r.still_forwarded.extend(gone);
    }
}

fn token(sub: &str, jti: &str) -> String {
    let now = 1_800_000_000i64;
    signed(
        serde_json::json!({"sub": sub, "name": "n", "role": "user", "iat": now - 10, "exp": now + 600, "jti": jti}),
    )
}

/// A Keycloak-shaped token: its roles in `realm_access.roles`, admin (when given) the third.
fn keycloak_token(sub: &str, roles: &[&str], scope: &str) -> String {
    let now = 1_800_000_000i64;
    signed(
        serde_json::json!({"sub": sub, "preferred_username": sub, "iat": now - 10, "exp": now + 600,
                              "scope": scope, "realm_access": {"roles": roles}}),
    )
}

fn signed(claims: serde_json::Value) -> String {
    let header = B64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = B64.encode(claims.to_string());
    let input = format!("{header}.{payload}");
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()) else {
        return String::new();
    };
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

fn config() -> String {
    serde_json::json!({
        "gateway": {"prefix": "/api/v1", "name": "hostemu"},
        "webdis_cluster": "127.0.0.1:7379",
        "jwt": {"secret": SECRET, "claims": {"role": "realm_access.roles"}},
        "revocation": {"cache_ttl": 0},
        "logs": {"enabled": false},
        "routes": [
            {"name": "users", "prefix": "/users", "methods": ["GET"]},
            {"name": "products", "prefix": "/products", "auth_required": false,
             "rate_limit": {"max_calls": 2, "period": 60}},
            {"name": "orders", "prefix": "/orders", "methods": ["GET"],
             "canary": {"users": ["user-001"], "header": "X-Canary"}},
            {"name": "auth", "prefix": "/auth", "methods": ["POST"], "auth_required": false},
            {"name": "admin", "prefix": "/admin", "methods": ["GET"], "roles": ["admin"],
             "scopes": ["orders:read"]}
        ]
    })
    .to_string()
}

/// Checks one condition of a case.
fn check(failures: &mut Vec<String>, host: &str, case: &str, ok: bool, detail: String) {
    if !ok {
        failures.push(format!("{host}: {case}: {detail}"));
    }
}

fn run(profile: &Profile, table: &Table, wasm: &[u8]) -> R<Vec<String>> {
    let mut f = Vec::new();
    let h = profile.name;

    // A log store needs timers: configured on a host without them (APISIX), it is refused at
    // configure time, naming the field, not silently skipped.
    let with_store = config().replace(
        r#""logs":{"enabled":false}"#,
        r#""logs":{"enabled":false,"store":{}}"#,
    );
    if !with_store.contains(r#""store":{}"#) {
        return Err("the log-store configuration could not be built".into());
    }
    let refused = Vm::new(wasm, profile, table, &with_store).err();
    let has_timers = !table.unimplemented.contains("proxy_set_tick_period_milliseconds");
    let ok = match &refused {
        None => has_timers,
        Some(e) => !has_timers && e.contains("logs.store: this host runs no timers"),
    };
    check(
        &mut f,
        h,
        "a log store",
        ok,
        format!("timers {has_timers}, refused: {refused:?}"),
    );

    let mut vm = Vm::new(wasm, profile, table, &config())?;

    // A second worker starts on the zone the first one wrote (each worker is a VM; the
    // shared data is the host's). It must find the host's shared data as the first did.
    let has_shared = !table.unimplemented.contains("proxy_set_shared_data");
    let second = Vm::with_shared(wasm, profile, table, &config(), vm.store.data().shared.clone())?;
    let offers = |vm: &Vm| {
        vm.store
            .data()
            .logs
            .iter()
            .find(|l| l.contains("host offers:"))
            .cloned()
            .unwrap_or_default()
    };
    for (which, v) in [("first", &vm), ("second", &second)] {
        let line = offers(v);
        check(
            &mut f,
            h,
            "each worker finds the shared data",
            line.contains(if has_shared {
                "shared data yes"
            } else {
                "shared data no"
            }),
            format!("{which} worker: {line:?}"),
        );
    }
    let own_lookup = |vm: &Vm, ctx: i32| vm.calls_of(ctx);

    // A public route: forwarded, nothing asked.
    vm.request(2, "/api/v1/products/1", None)?;
    check(
        &mut f,
        h,
        "public route",
        vm.req(2).continued && vm.status(2).is_none(),
        format!("{:?}", vm.req(2)),
    );
    vm.finish(2)?;

    // A client's copy of the identity header on a public route: stripped where the host
    // removes headers, refused where the upstream would still get it; never forwarded.
    vm.request_with(20, "GET", "/api/v1/products/1", None, &[("X-User-Id", "admin")])?;
    let r = vm.req(20);
    let upstream_sees = r.continued
        && r.headers
            .iter()
            .chain(&r.still_forwarded)
            .any(|(k, v)| k.eq_ignore_ascii_case("x-user-id") && v == "admin");
    let refused = vm.status(20) == Some(400);
    check(
        &mut f,
        h,
        "a forged identity header",
        !upstream_sees && (refused || !profile.forwards_removed_headers),
        format!("{r:?}"),
    );
    vm.finish(20)?;

    // A valid token: its own lookup, answered clean, then forwarded with the identity.
    let t = token("user-002", "a");
    vm.request(3, "/api/v1/users/1", Some(&t))?;
    let calls = own_lookup(&vm, 3);
    check(
        &mut f,
        h,
        "valid token: one lookup of its own",
        calls.len() == 1,
        format!("{calls:?}"),
    );
    check(
        &mut f,
        h,
        "valid token: not forwarded before its answer",
        !vm.req(3).continued,
        String::new(),
    );
    for c in calls {
        vm.answer(c, 200, CLEAN)?;
    }
    check(
        &mut f,
        h,
        "valid token: forwarded",
        vm.req(3).continued && vm.status(3).is_none(),
        format!("{:?}", vm.req(3)),
    );
    check(
        &mut f,
        h,
        "valid token: identity",
        vm.header(3, "x-user-id").as_deref() == Some("user-002"),
        format!("{:?}", vm.header(3, "x-user-id")),
    );
    vm.finish(3)?;

    // Identity providers' tokens: admin as the third of Keycloak's roles passes the admin route
    // and the upstream sees every role; a token without the route's scope gets 403 with
    // RFC 6750's challenge.
    let t = keycloak_token(
        "kc-1",
        &["offline_access", "default-roles-demo", "admin"],
        "openid orders:read",
    );
    vm.request(30, "/api/v1/admin/x", Some(&t))?;
    for c in own_lookup(&vm, 30) {
        vm.answer(c, 200, CLEAN)?;
    }
    check(
        &mut f,
        h,
        "a role list: admin third passes, every role forwarded",
        vm.req(30).continued
            && vm.header(30, "x-user-role").as_deref() == Some("offline_access,default-roles-demo,admin"),
        format!("{:?}", vm.req(30)),
    );
    vm.finish(30)?;
    let t = keycloak_token("kc-2", &["offline_access", "admin"], "openid");
    vm.request(31, "/api/v1/admin/x", Some(&t))?;
    check(
        &mut f,
        h,
        "a missing scope: 403 insufficient_scope",
        vm.status(31) == Some(403) && !vm.req(31).continued,
        format!("{:?}", vm.req(31)),
    );
    vm.finish(31)?;

    // A revoked token: 401, never forwarded.
    let t = token("user-003", "b");
    vm.request(4, "/api/v1/users/1", Some(&t))?;
    for c in own_lookup(&vm, 4) {
        vm.answer(c, 200, BLACKLISTED)?;
    }
    check(
        &mut f,
        h,
        "revoked token",
        vm.status(4) == Some(401) && !vm.req(4).continued,
        format!("{:?}", vm.req(4)),
    );
    vm.finish(4)?;

    // The store failing: 503 (failure_mode deny).
    let t = token("user-004", "c");
    vm.request(5, "/api/v1/users/1", Some(&t))?;
    for c in own_lookup(&vm, 5) {
        vm.answer(c, 500, "oops")?;
    }
    check(
        &mut f,
        h,
        "store failure",
        vm.status(5) == Some(503) && !vm.req(5).continued,
        format!("{:?}", vm.req(5)),
    );
    vm.finish(5)?;

    // A bad token: 401 at once.
    vm.request(6, "/api/v1/users/1", Some("abc"))?;
    check(
        &mut f,
        h,
        "bad token",
        vm.status(6) == Some(401) && vm.calls_of(6).is_empty(),
        format!("{:?}", vm.req(6)),
    );
    vm.finish(6)?;

    // The route limit: 2 a minute (the public call above was one).
    vm.request(7, "/api/v1/products/1", None)?;
    vm.finish(7)?;
    vm.request(8, "/api/v1/products/1", None)?;
    check(
        &mut f,
        h,
        "route limit",
        vm.status(8) == Some(429),
        format!("{:?}", vm.req(8)),
    );
    vm.finish(8)?;

    // The canary: user-001 always, the header Envoy (or the host's routing) routes on.
    let t = token("user-001", "d");
    vm.request(9, "/api/v1/orders/1", Some(&t))?;
    for c in own_lookup(&vm, 9) {
        vm.answer(c, 200, CLEAN)?;
    }
    check(
        &mut f,
        h,
        "canary",
        vm.req(9).continued && vm.header(9, ROUTE_HEADER).as_deref() == Some(ROUTE_VALUE),
        format!("{:?}", vm.req(9)),
    );
    vm.finish(9)?;

    // Two requests with one token at once.
    let t = token("user-005", "e");
    vm.request(10, "/api/v1/users/1", Some(&t))?;
    vm.request(11, "/api/v1/users/1", Some(&t))?;
    let (first, second) = (own_lookup(&vm, 10), own_lookup(&vm, 11));
    if profile.switches_context {
        check(
            &mut f,
            h,
            "one token twice (Envoy): one lookup, shared",
            first.len() + second.len() == 1,
            format!("{first:?} {second:?}"),
        );
    } else {
        check(
            &mut f,
            h,
            "one token twice: a lookup each",
            first.len() == 1 && second.len() == 1,
            format!("{first:?} {second:?}"),
        );
    }
    for c in second.iter().chain(first.iter()) {
        vm.answer(*c, 200, CLEAN)?;
    }
    check(
        &mut f,
        h,
        "one token twice: both forwarded",
        vm.req(10).continued && vm.req(11).continued,
        format!("{:?} {:?}", vm.req(10), vm.req(11)),
    );
    vm.finish(10)?;
    vm.finish(11)?;

    // A logout: its own lookup, then its write (SETEX, then SET NX), replied only once the
    // store confirmed it; never forwarded to the upstream of the route it sits under.
    let t = token("user-006", "f");
    vm.request_method(12, "POST", "/api/v1/auth/logout", Some(&t))?;
    for (step, answer) in [CLEAN, r#"{"SETEX":[true,"OK"]}"#, r#"{"SET":[true,"OK"]}"#]
        .iter()
        .enumerate()
    {
        let calls = own_lookup(&vm, 12);
        check(
            &mut f,
            h,
            "logout: one call at a time, its own",
            calls.len() == 1,
            format!("step {step}: {calls:?}"),
        );
        for c in calls {
            vm.answer(c, 200, answer)?;
        }
    }
    check(
        &mut f,
        h,
        "logout",
        vm.status(12) == Some(200) && !vm.req(12).continued,
        format!("{:?}", vm.req(12)),
    );
    vm.finish(12)?;
    vm.request(13, "/api/v1/users/1", Some(&t))?;
    for c in own_lookup(&vm, 13) {
        vm.answer(c, 200, BLACKLISTED)?;
    }
    check(
        &mut f,
        h,
        "logged-out token refused",
        vm.status(13) == Some(401),
        format!("{:?}", vm.req(13)),
    );
    vm.finish(13)?;

    // Above all: nothing went upstream without its own token's clean answer (where only the
    // dispatching context can be resumed), and the host saw nothing it would mishandle.
    let st = vm.store.data();
    for (ctx, r) in &st.reqs {
        let authenticated = r.headers.iter().any(|(k, _)| k == "authorization");
        if authenticated && r.continued && !profile.switches_context && !r.answers.iter().any(|c| *c) {
            f.push(format!(
                "{h}: context {ctx} went upstream without its own clean lookup"
            ));
        }
    }
    f.extend(st.violations.iter().map(|v| format!("{h}: {v}")));
    Ok(f)
}

fn main() -> ExitCode {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let wasm_path = std::env::args()
        .nth(1)
        .map_or_else(|| root.join("build/gateway_filter.wasm"), PathBuf::from);
    let Ok(wasm) = std::fs::read(&wasm_path) else {
        eprintln!("hostemu: cannot read {} (make build first)", wasm_path.display());
        return ExitCode::from(2);
    };
    let tables = root.join("tests/hosts");
    let mut failures = Vec::new();
    for profile in profiles() {
        let table = match load_table(&tables, profile.table) {
            Ok(t) => t,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        match run(&profile, &table, &wasm) {
            Ok(f) if f.is_empty() => println!(
                "hostemu: {} (table at {}): every case passed",
                profile.name,
                table.commit.get(..10).unwrap_or(&table.commit)
            ),
            Ok(f) => failures.extend(f),
            Err(e) => failures.push(format!("{}: {e}", profile.name)),
        }
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("hostemu: FAIL {f}");
        }
        ExitCode::FAILURE
    }
}

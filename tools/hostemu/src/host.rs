//! The emulated host: each profile's function table and semantics (read from the hosts'
//! sources), the request and call records, and the host functions the module imports.

use super::*;

/// What a host is, beyond its function table.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    pub(crate) name: &'static str,
    pub(crate) table: &'static str,
    /// `set_effective_context` switches the context later calls act on.
    pub(crate) switches_context: bool,
    /// The request goes on by itself after a call's answer (APISIX).
    pub(crate) continues_after_call: bool,
    /// Calls allowed per request at once.
    pub(crate) calls_per_request: usize,
    /// What `proxy_get_property("xds.node")` answers at the root: Ok, or this status.
    pub(crate) xds_node: Option<i32>,
    /// An unknown foreign function traps (Kong) or answers this status.
    pub(crate) foreign_traps: bool,
    pub(crate) on_log: bool,
    /// `set_shared_data` with cas 0 writes only a missing key, and a non-zero cas never creates
    /// one (Kong: `ngx_wa_shm_kv_set_locked` compares the cas with the node's, 0 for none);
    /// Envoy reads cas 0 as no check.
    pub(crate) cas_zero_creates: bool,
    /// A removed request header is only marked, and nginx's proxy module still sends it
    /// upstream (Kong: `ngx_http_wasm_headers.c` sets `hash = 0`; nginx's
    /// `ngx_http_proxy_create_request` does not skip such entries; seen in a real Kong).
    pub(crate) forwards_removed_headers: bool,
}
pub(crate) fn profiles() -> Vec<Profile> {
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
            // Removal goes through OpenResty's `ngx_http_lua_ffi_req_set_header`, whose
            // `ngx_http_set_header_helper` takes every copy out of nginx's header list
            // (`ngx_http_lua_rm_header_helper`), so nginx's proxy module sends none of them
            // (lua-nginx-module bbed32a, ngx_http_lua_headers_in.c).
            forwards_removed_headers: false,
        },
    ]
}
/// A host function table (`tests/hosts/*.json`).
pub(crate) struct Table {
    pub(crate) env: HashSet<String>,
    pub(crate) traps: HashSet<String>,
    pub(crate) unimplemented: HashSet<String>,
    pub(crate) wasi: HashSet<String>,
    pub(crate) commit: String,
}
pub(crate) fn strings(v: &serde_json::Value, key: &str) -> HashSet<String> {
    v.get(key)
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}
pub(crate) fn load_table(dir: &Path, file: &str) -> R<Table> {
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
pub(crate) struct Req {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) reply: Option<(i32, String)>,
    pub(crate) continued: bool,
    pub(crate) pending: usize,
    /// Answers of this request's own lookups: clean or not.
    pub(crate) answers: Vec<bool>,
    /// Headers the filter removed that the upstream still receives (see the profile).
    pub(crate) still_forwarded: Vec<(String, String)>,
}
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) token: i32,
    pub(crate) ctx: i32,
    pub(crate) path: String,
}
pub(crate) struct St {
    pub(crate) profile: Profile,
    pub(crate) table_unimplemented: HashSet<String>,
    pub(crate) current: i32,
    pub(crate) reqs: HashMap<i32, Req>,
    pub(crate) calls: Vec<Call>,
    pub(crate) answer: (i32, Vec<u8>),
    pub(crate) shared: HashMap<String, (Vec<u8>, u32)>,
    pub(crate) config: Vec<u8>,
    pub(crate) now_ns: u64,
    pub(crate) next_token: i32,
    pub(crate) logs: Vec<String>,
    pub(crate) violations: Vec<String>,
}
pub(crate) fn arg_i32(args: &[Val], i: usize) -> i32 {
    match args.get(i) {
        Some(Val::I32(v)) => *v,
        _ => 0,
    }
}
pub(crate) fn memory(caller: &Caller<'_, St>) -> R<wasmi::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err("no memory export".into()),
    }
}
pub(crate) fn read(caller: &Caller<'_, St>, ptr: i32, len: i32) -> R<Vec<u8>> {
    let m = memory(caller)?;
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    m.data(caller)
        .get(p..p.saturating_add(l))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "read out of bounds".to_string())
}
/// The module's environment: `NAME=value\0`.
const ENVIRON: &[u8] = b"INTROSPECTION_SECRET=hostemu-secret\0";

pub(crate) fn write(caller: &mut Caller<'_, St>, ptr: i32, bytes: &[u8]) -> R<()> {
    let m = memory(caller)?;
    let p = ptr as u32 as usize;
    m.data_mut(caller)
        .get_mut(p..p.saturating_add(bytes.len()))
        .ok_or_else(|| "write out of bounds".to_string())?
        .copy_from_slice(bytes);
    Ok(())
}
/// Copies `bytes` into memory the module allocates, and writes its address and size.
pub(crate) fn give(caller: &mut Caller<'_, St>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> R<()> {
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
pub(crate) fn pairs_encode(pairs: &[(String, String)]) -> Vec<u8> {
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
pub(crate) fn pairs_decode(bytes: &[u8]) -> Vec<(String, String)> {
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
pub(crate) fn host(name: &str, caller: &mut Caller<'_, St>, args: &[Val]) -> R<i32> {
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
        n if n == "proxy_get_buffer_bytes" || n.contains("header_map") => header_maps(n, caller, args),
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
/// The buffers and header maps of the current request.
fn header_maps(name: &str, caller: &mut Caller<'_, St>, args: &[Val]) -> R<i32> {
    let a = |i| arg_i32(args, i);
    let ctx = caller.data().current;
    match name {
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
        _ => Ok(12),
    }
}

pub(crate) fn wasi(name: &str, caller: &mut Caller<'_, St>, args: &[Val]) -> R<i32> {
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
        // One variable, the introspection client secret the cases' configuration names (the
        // hosts pass environment variables to the module as WASI's environ).
        "environ_sizes_get" => {
            write(caller, a(0), &1u32.to_le_bytes())?;
            write(caller, a(1), &(ENVIRON.len() as u32).to_le_bytes())?;
            Ok(0)
        }
        "environ_get" => {
            write(caller, a(0), &a(1).to_le_bytes())?;
            write(caller, a(1), ENVIRON)?;
            Ok(0)
        }
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
/// Removes a request header (names compare without case, as every host does); where the host
/// only marks it, the upstream still gets it.
pub(crate) fn remove_header(r: &mut Req, key: &str, marks: bool) {
    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut r.headers)
        .into_iter()
        .partition(|(k, _)| k.eq_ignore_ascii_case(key));
    r.headers = kept;
    if marks {
        r.still_forwarded.extend(gone);
    }
}

//! One worker: the module instantiated under a profile, with the calls a test drives (a
//! request, a call's answer, the stream's end) and what it can read back.

use super::*;

pub(crate) struct Vm {
    pub(crate) store: Store<St>,
    pub(crate) instance: Instance,
}
impl Vm {
    pub(crate) fn new(wasm: &[u8], profile: &Profile, table: &Table, config: &str) -> R<Vm> {
        Vm::with_shared(wasm, profile, table, config, HashMap::new())
    }

    /// A VM that starts on a shared-data zone other VMs (workers) already wrote.
    pub(crate) fn with_shared(
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

    pub(crate) fn func(&self, name: &str) -> Option<Func> {
        self.instance.get_func(&self.store, name)
    }

    pub(crate) fn call(&mut self, name: &str, args: &[i32]) -> R<i32> {
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
    pub(crate) fn request(&mut self, ctx: i32, path: &str, token: Option<&str>) -> R<i32> {
        self.request_method(ctx, "GET", path, token)
    }

    pub(crate) fn request_method(
        &mut self,
        ctx: i32,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> R<i32> {
        self.request_with(ctx, method, path, token, &[])
    }

    pub(crate) fn request_with(
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
    pub(crate) fn answer(&mut self, token: i32, status: i32, json: &str) -> R<()> {
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

    pub(crate) fn finish(&mut self, ctx: i32) -> R<()> {
        if self.store.data().profile.on_log {
            self.store.data_mut().current = ctx;
            self.call("proxy_on_log", &[ctx])?;
        }
        self.call("proxy_on_done", &[ctx])?;
        self.call("proxy_on_delete", &[ctx])?;
        Ok(())
    }

    pub(crate) fn req(&self, ctx: i32) -> &Req {
        static EMPTY: std::sync::OnceLock<Req> = std::sync::OnceLock::new();
        self.store
            .data()
            .reqs
            .get(&ctx)
            .unwrap_or_else(|| EMPTY.get_or_init(Req::default))
    }

    pub(crate) fn calls_of(&self, ctx: i32) -> Vec<i32> {
        self.store
            .data()
            .calls
            .iter()
            .filter(|c| c.ctx == ctx)
            .map(|c| c.token)
            .collect()
    }

    pub(crate) fn status(&self, ctx: i32) -> Option<i32> {
        self.req(ctx).reply.as_ref().map(|r| r.0)
    }

    pub(crate) fn header(&self, ctx: i32, name: &str) -> Option<String> {
        self.req(ctx)
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

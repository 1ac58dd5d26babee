//! The gateway's metrics on Envoy's: families declared at configuration time, labelled names
//! mapped to them.

use super::*;

/// The gateway's metrics on Envoy's: families are declared while the configuration is created
/// (the ABI allows it only then), each labelled family once with its label names; a name the
/// gateway uses later (`route=.=users;.;outcome=.=allowed;.;gateway_requests_total`) becomes
/// that family with those label values, so Prometheus shows the same series as for the .wasm.
pub(crate) struct MetricTable {
    pub(crate) envoy: EnvoyConfig,
    /// Family (or plain name) → (histogram, Envoy's id, label count).
    pub(crate) families: HashMap<String, (bool, usize, usize)>,
    /// The gateway's ids (1-based indexes) and their names.
    pub(crate) entries: Mutex<Entries>,
}

/// The gateway's names → ids, and the entries by id (1-based).
pub(crate) type Entries = (HashMap<String, u32>, Vec<Arc<MetricEntry>>);

pub(crate) struct MetricEntry {
    pub(crate) histogram: bool,
    pub(crate) envoy_id: usize,
    pub(crate) values: Vec<String>,
    /// A counter's increments not yet handed to Envoy, shared by every worker: a worker adds
    /// to it (one atomic add), the main thread hands the sum over on its tick
    /// ([`MetricTable::hand_over`]). A labelled counter's update in Envoy looks its series up
    /// in the stats scope each time: once per counter per tick instead of per request.
    pub(crate) pending: AtomicU64,
}

impl MetricTable {
    pub(crate) fn new(envoy: EnvoyConfig) -> Self {
        MetricTable {
            envoy,
            families: HashMap::new(),
            entries: Mutex::new((HashMap::new(), Vec::new())),
        }
    }

    /// Declares `name`'s family (configuration time only).
    pub(crate) fn declare(&mut self, histogram: bool, name: &str) -> bool {
        let (family, tags) = stat::parse(name);
        if self.families.contains_key(family) {
            return true;
        }
        let labels: Vec<&str> = tags.iter().map(|(t, _)| *t).collect();
        match abi::define_metric(self.envoy, histogram, family, &labels) {
            Some(id) => {
                self.families
                    .insert(family.to_string(), (histogram, id, labels.len()));
                true
            }
            None => false,
        }
    }

    /// The gateway's id for `name`, if its family was declared.
    pub(crate) fn id_of(&self, name: &str) -> Option<u32> {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (names, entries) = &mut *guard;
        if let Some(id) = names.get(name) {
            return Some(*id);
        }
        let (family, tags) = stat::parse(name);
        let (histogram, envoy_id, labels) = *self.families.get(family)?;
        if tags.len() != labels {
            return None;
        }
        entries.push(Arc::new(MetricEntry {
            histogram,
            envoy_id,
            values: tags.iter().map(|(_, v)| v.to_string()).collect(),
            pending: AtomicU64::new(0),
        }));
        let id = u32::try_from(entries.len()).ok()?;
        names.insert(name.to_string(), id);
        Some(id)
    }

    /// Hands every counter's pending increments to Envoy (the main thread, on its tick).
    pub(crate) fn hand_over(&self) {
        let due: Vec<(usize, Vec<String>, u64)> = {
            let guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            guard
                .1
                .iter()
                .filter(|e| !e.histogram)
                .filter_map(|e| {
                    let n = e.pending.swap(0, Ordering::Relaxed);
                    (n > 0).then(|| (e.envoy_id, e.values.clone(), n))
                })
                .collect()
        };
        for (id, values, n) in due {
            abi::increment_counter(self.envoy, id, &values, n);
        }
    }

    pub(crate) fn entry(&self, id: u32) -> Option<Arc<MetricEntry>> {
        let guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.get((id as usize).checked_sub(1)?).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table whose families were declared (here by hand: declaring asks Envoy).
    fn table() -> MetricTable {
        let mut t = MetricTable::new(EnvoyConfig(std::ptr::null_mut()));
        t.families.insert("gateway_requests_total".into(), (false, 7, 2));
        t.families
            .insert("gateway_request_duration_ms".into(), (true, 8, 0));
        t
    }

    #[test]
    fn a_labelled_name_becomes_its_family_with_those_values() {
        let t = table();
        let name = stat::name(
            "gateway_requests_total",
            &[("route", "users"), ("outcome", "allowed")],
        );
        let id = t.id_of(&name).unwrap();
        assert_eq!(t.id_of(&name), Some(id), "one id per name");
        let e = t.entry(id).unwrap();
        assert_eq!(
            (e.histogram, e.envoy_id, e.values.clone()),
            (false, 7, vec!["users".to_string(), "allowed".to_string()])
        );
        let other = stat::name(
            "gateway_requests_total",
            &[("route", "users"), ("outcome", "revoked")],
        );
        assert_ne!(t.id_of(&other), Some(id));
        assert!(
            t.entry(t.id_of("gateway_request_duration_ms").unwrap())
                .unwrap()
                .histogram
        );
    }

    #[test]
    fn an_undeclared_family_or_a_wrong_label_count_has_no_id() {
        let t = table();
        assert_eq!(t.id_of("gateway_nothing_total"), None);
        assert_eq!(
            t.id_of(&stat::name("gateway_requests_total", &[("route", "users")])),
            None
        );
        assert!(t.entry(0).is_none());
        assert!(t.entry(99).is_none());
    }
}

//! Shared data, process-wide, with proxy-wasm's rules: what every worker's gateway and the
//! network filter share (buckets, caches, leases, the connection counts).

use super::*;

// ---------------------------------------------------------------------------------------------
// Shared data: process-wide, with proxy-wasm's rules.

/// Envoy's shared data for proxy-wasm, in the process: a value and a version per key; a write
/// with `cas` 0 is unconditional, another must name the current version (a missing key has
/// none, and is created). Bounded by the gateway's own key discipline, as in Envoy.
#[derive(Default)]
pub struct SharedMemory {
    map: Mutex<HashMap<String, (Vec<u8>, u32)>>,
}

impl SharedMemory {
    pub(crate) fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    pub(crate) fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let next = match map.get(key) {
            Some((_, current)) if cas != 0 && *current != cas => return Err(SetError::CasMismatch),
            Some((_, current)) => current.wrapping_add(1).max(1),
            None => 1,
        };
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

impl SharedStore for SharedMemory {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        SharedMemory::get(self, key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        SharedMemory::set(self, key, value, cas.unwrap_or(0))
    }
}

pub(crate) static SHARED: LazyLock<SharedMemory> = LazyLock::new(SharedMemory::default);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_follow_proxy_wasms_cas_rules() {
        let m = SharedMemory::default();
        assert_eq!(m.get("k"), None);
        // A missing key is created whatever the cas.
        assert!(m.set("k", b"a", 7).is_ok());
        assert_eq!(m.get("k"), Some((b"a".to_vec(), 1)));
        // cas 0: unconditional; another must name the current version.
        assert!(m.set("k", b"b", 0).is_ok());
        assert_eq!(m.get("k"), Some((b"b".to_vec(), 2)));
        assert_eq!(m.set("k", b"c", 1), Err(SetError::CasMismatch));
        assert_eq!(
            m.get("k"),
            Some((b"b".to_vec(), 2)),
            "a refused write changes nothing"
        );
        assert!(m.set("k", b"c", 2).is_ok());
        assert_eq!(m.get("k").map(|(_, v)| v), Some(3));
    }

    #[test]
    fn versions_never_come_back_to_zero() {
        let m = SharedMemory::default();
        m.map.lock().unwrap().insert("k".into(), (Vec::new(), u32::MAX));
        assert!(m.set("k", b"x", u32::MAX).is_ok());
        // 0 means "unconditional": a version that wrapped to it could never be matched.
        assert_eq!(m.get("k").map(|(_, v)| v), Some(1));
    }
}

//! The client address a per-IP bucket is charged to (`X-Forwarded-For` as far as trusted).

/// The client address: the peer address, or with `trusted_hops` = N > 0 the N-th entry from the
/// right of `X-Forwarded-For` as the filter sees it (the rendered Envoy appends the peer address,
/// so N = 1 trusts one proxy in front of Envoy). Falls back to the peer when XFF is too short or
/// an entry is not an IP address.
pub fn client_ip(peer: Option<&str>, xff: Option<&str>, trusted_hops: u32) -> Option<String> {
    if trusted_hops > 0 {
        if let Some(xff) = xff {
            let entries: Vec<&str> = xff.split(',').map(str::trim).collect();
            let idx = entries.len().checked_sub(1 + trusted_hops as usize);
            if let Some(candidate) = idx.and_then(|i| entries.get(i)) {
                if let Ok(ip) = candidate.parse::<std::net::IpAddr>() {
                    return Some(ip.to_string());
                }
            }
        }
    }
    peer.map(strip_port)
}

/// `1.2.3.4:5678` → `1.2.3.4`, `[::1]:80` → `::1`.
pub fn strip_port(addr: &str) -> String {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host.to_string()
        }
        _ => addr.to_string(),
    }
}

/// The client an address belongs to, for per-client bounds: an IPv4 address itself, an IPv6
/// address's /64 (`2001:db8:1:2::/64`; IPv4-mapped addresses as IPv4), anything else as given.
pub fn client_group(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let [a, b, c, d, ..] = v6.segments();
                format!("{}/64", std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        },
        _ => ip.to_string(),
    }
}

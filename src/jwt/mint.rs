//! Tokens the gateway issues itself (refresh), signed with the issuer's shared secret.

use super::*;

impl Verifier {
    /// Whether the gateway can mint tokens for this issuer (it holds its secret).
    pub fn can_issue(&self, issuer: usize) -> bool {
        matches!(
            self.issuers.get(issuer).map(|i| &i.source),
            Some(Source::Secret(_))
        )
    }

    /// Issues a token for the same identity (`sub`, `name`, `role`, plus the issuer's `iss` and
    /// first audience) with new `iat`, `exp` and `jti`, signed with the issuer's first algorithm.
    /// Only issuers with a secret can do this.
    pub fn issue(&self, id: &Identity, now: i64, ttl_seconds: i64, jti: &str) -> Result<String, String> {
        let issuer = self.issuers.get(id.issuer).ok_or("unknown issuer")?;
        let Source::Secret(keys) = &issuer.source else {
            return Err(format!("issuer {} has no secret to sign with", issuer.name));
        };
        // The identity where the issuer's claim map reads it, so the new token verifies to the
        // same caller (roles and scopes included).
        let map = &issuer.claims;
        let mut custom = Map::new();
        if let Some(sub) = &id.user_id {
            claims::set(&mut custom, &map.user_id, sub.clone().into());
        }
        if let Some(name) = &id.user_name {
            claims::set(&mut custom, &map.user_name, name.clone().into());
        }
        // One role as the reference writes it (a string), several as a list (as one
        // space-separated string where the issuer reads them so).
        let role: Value = match (id.roles.as_slice(), map.role_format) {
            ([one], _) => one.clone().into(),
            (all, claims::RoleFormat::SpaceSeparated) => all.join(" ").into(),
            (all, claims::RoleFormat::List) => all.to_vec().into(),
        };
        claims::set(&mut custom, &map.role, role);
        if !id.scopes.is_empty() {
            let path = map.scopes.clone().unwrap_or_else(|| ClaimPath::named("scope"));
            claims::set(&mut custom, &path, id.scopes.join(" ").into());
        }
        custom.insert("jti".into(), jti.into());
        // The lineage's authentication time: a ban compares with it, so refreshing cannot
        // outrun a ban (a token without `iat` counts as authenticated at 0, before any ban).
        custom.insert("auth_time".into(), id.authenticated_at().unwrap_or(0).into());
        // A bound token refreshes into a token bound to the same key or certificate: never
        // into a bearer token a thief could use without the key.
        match &id.binding {
            Binding::None => {}
            Binding::Dpop(jkt) => {
                custom.insert("cnf".into(), serde_json::json!({ "jkt": jkt }));
            }
            Binding::Certificate(hash) => {
                use base64::Engine as _;
                let x5t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash);
                custom.insert("cnf".into(), serde_json::json!({ "x5t#S256": x5t }));
            }
        }
        if let Some(iss) = &issuer.iss {
            custom.insert("iss".into(), iss.clone().into());
        }
        if let Some(aud) = issuer.audiences.first() {
            custom.insert("aud".into(), aud.clone().into());
        }
        let mut claims = Claims::new(custom);
        claims.issued_at = chrono::DateTime::from_timestamp(now, 0);
        claims.expiration = chrono::DateTime::from_timestamp(now.saturating_add(ttl_seconds), 0);
        let header = jwt_compact::Header::empty().with_token_type(issuer.types.minted());
        let key = keys.keys.first().ok_or("no signing key")?;
        let signed = match &key.material {
            Material::Hs256(k) => Hs256.token(&header, &claims, k),
            Material::Hs384(k) => Hs384.token(&header, &claims, k),
            Material::Hs512(k) => Hs512.token(&header, &claims, k),
            _ => return Err("not an HMAC key".to_string()),
        };
        signed.map_err(|e| e.to_string())
    }
}

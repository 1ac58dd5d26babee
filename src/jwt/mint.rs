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
        let mut custom = Map::new();
        if let Some(sub) = &id.user_id {
            custom.insert("sub".into(), sub.clone().into());
        }
        if let Some(name) = &id.user_name {
            custom.insert("name".into(), name.clone().into());
        }
        // One role as the reference writes it (a string), several as a list.
        let role: Value = match id.roles.as_slice() {
            [one] => one.clone().into(),
            all => all.to_vec().into(),
        };
        custom.insert("role".into(), role);
        custom.insert("jti".into(), jti.into());
        // The lineage's authentication time: a ban compares with it, so refreshing cannot
        // outrun a ban (a token without `iat` counts as authenticated at 0, before any ban).
        custom.insert("auth_time".into(), id.authenticated_at().unwrap_or(0).into());
        if let Some(iss) = &issuer.iss {
            custom.insert("iss".into(), iss.clone().into());
        }
        if let Some(aud) = issuer.audiences.first() {
            custom.insert("aud".into(), aud.clone().into());
        }
        let mut claims = Claims::new(custom);
        claims.issued_at = chrono::DateTime::from_timestamp(now, 0);
        claims.expiration = chrono::DateTime::from_timestamp(now.saturating_add(ttl_seconds), 0);
        let header = jwt_compact::Header::empty().with_token_type("JWT");
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

//! Signature checks done by the host: Envoy's `verify_signature` foreign function (BoringSSL)
//! takes a public key as DER SubjectPublicKeyInfo, a hash name, the signature and the signed
//! bytes, in a small protobuf. Measured in V8 (README, "Signature verification"): compiled-in
//! RSA and ECDSA cost hundreds of microseconds to milliseconds per token, BoringSSL tens. The
//! filter probes the function once per VM and falls back to its own code where it is missing
//! (other proxy-wasm hosts) or cannot do the job (PSS padding, Ed25519).

/// A host's signature check: `(hash, spki_der, signature, message)` → `Some(valid)`, or `None`
/// when the host cannot say (missing function, unexpected reply).
pub type NativeVerify<'a> = &'a mut HostCheck<'a>;

/// The host's check as a function: `(hash, spki_der, signature, message)` → `Some(valid)`.
pub type HostCheck<'a> = dyn FnMut(&str, &[u8], &[u8], &[u8]) -> Option<bool> + 'a;

/// The same as a plain function pointer (the in-memory test host's).
pub type HostCheckFn = fn(&str, &[u8], &[u8], &[u8]) -> Option<bool>;

/// The foreign function's name in Envoy.
pub const FUNCTION: &str = "verify_signature";

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = bytes.get(skip..).unwrap_or(&[]);
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    der_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER from unsigned big-endian bytes.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed = bytes
        .iter()
        .position(|b| *b != 0)
        .map_or(&[0u8][..], |i| bytes.get(i..).unwrap_or(&[0]));
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    der(0x02, &content)
}

const OID_RSA: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

fn spki(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut bits = Vec::with_capacity(key.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(key);
    let mut body = der(0x30, algorithm);
    body.extend(der(0x03, &bits));
    der(0x30, &body)
}

/// SubjectPublicKeyInfo of an RSA key from its modulus and exponent.
pub fn spki_rsa(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let mut key = der_uint(modulus);
    key.extend(der_uint(exponent));
    let mut alg = OID_RSA.to_vec();
    alg.extend_from_slice(&[0x05, 0x00]);
    spki(&alg, &der(0x30, &key))
}

/// SubjectPublicKeyInfo of a P-256 or P-384 (`p384`) key from its uncompressed point.
pub fn spki_ec(point: &[u8], p384: bool) -> Vec<u8> {
    let mut alg = OID_EC.to_vec();
    alg.extend_from_slice(if p384 { OID_P384 } else { OID_P256 });
    spki(&alg, point)
}

/// A JWS ECDSA signature (`r || s`, fixed width) as the DER `SEQUENCE { r, s }` the host wants.
pub fn ecdsa_der(raw: &[u8], width: usize) -> Option<Vec<u8>> {
    if raw.len() != 2 * width {
        return None;
    }
    let (r, s) = raw.split_at(width);
    let mut body = der_uint(r);
    body.extend(der_uint(s));
    Some(der(0x30, &body))
}

fn varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    out.push((number << 3) | 2);
    varint(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// `VerifySignatureArguments { hash_function = 1; public_key = 2; signature = 3; text = 4 }`.
pub fn encode_arguments(hash: &str, spki: &[u8], signature: &[u8], text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hash.len() + spki.len() + signature.len() + text.len() + 16);
    field(&mut out, 1, hash.as_bytes());
    field(&mut out, 2, spki);
    field(&mut out, 3, signature);
    field(&mut out, 4, text);
    out
}

/// `VerifySignatureResult { bool result = 1; string error = 2; }`: the verdict, or `None` for
/// a reply that is not one.
pub fn decode_result(reply: &[u8]) -> Option<bool> {
    let mut result = false;
    let mut rest = reply;
    while let Some((&key, tail)) = rest.split_first() {
        match key {
            0x08 => {
                let (&v, tail) = tail.split_first()?;
                result = v == 1;
                rest = tail;
            }
            0x12 => {
                let (&len, tail) = tail.split_first()?;
                if len >= 0x80 {
                    // A long error message: the verdict is already known to be false.
                    return Some(false);
                }
                rest = tail.get(usize::from(len)..)?;
            }
            _ => return None,
        }
    }
    Some(result)
}

/// A known-good RS256 signature, to find out once per VM whether the host checks signatures.
pub mod probe {
    pub const MESSAGE: &[u8] = b"gateway-filter probe";
    pub const MODULUS: &str = "1UeWPEW2sdWinVg65UJmQemG-DAVTmFmf6WfKB-wuAtF0YnxYNYZc9FTzBZ-6kMv_I_jX_jthyrunFoEf7V2atuwrGvOat5YWN7dpO0eA2TcnOG0rh2f1dBL4ZofMqLs_JF3bA3uMlO-J-woHbttCrz8cHDbquk-chaZVEgFbBKrRbyWEIMSGm83gZyVwncQEqyUZ68pzAQjRW_A8Hm2tHHQm2vojFAIRxqHd6czeeLp8SKSafZUNLFDGBQwbH8oBvlMjODMRmKB21VCuTK1i7CjEHcXh8hKY9gAakGK7cDdTK8YSnbfKhzsRw0UaAyGguQFhpB6NahcJALA8kKk6w";
    pub const SIGNATURE: &str = "tZmiB6qIxu_C7TJleD0JCRkvewiboyT3k5wi6416NpiiTsHS2MB92sdTG72JaEfjFbMeNThplEjlkWJ8DxNUlrTvMIMTYmpwD4ZxHNYBUPgJzwebRWAPDO2dg1zPlaYv1swU3ESkTGJKZLF224QaWNWPUDLNdXBx_ajvj3knyVNow8YBQhlv1a_QhkHLOdB-VLo-Jh_CJR7b6eHrxMYJ8WOvCxN2B-DPljFCyrC-pOxukz-nNkIG5zPCTBmayVXouyv1Pi0sVD4iLzYLpBaImjE2fYhesVTdSvmxJuSesVKPXvu9HlU-pRlJWHiGDQfjuL78-YfwP_KoV3YPt7rGaQ";

    /// Whether `native` verifies the probe (and refuses it tampered): then the host's checks
    /// can be trusted for every token.
    pub fn works(native: super::NativeVerify<'_>) -> bool {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (Ok(n), Ok(sig)) = (b64.decode(MODULUS), b64.decode(SIGNATURE)) else {
            return false;
        };
        let key = super::spki_rsa(&n, &[1, 0, 1]);
        let good = native("sha256", &key, &sig, MESSAGE);
        let bad = native("sha256", &key, &sig, b"gateway-filter probE");
        good == Some(true) && bad == Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn public_keys_encode_as_openssl_does() {
        // Expected values from Python's `cryptography` (OpenSSL) for the same keys.
        use base64::Engine as _;
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(probe::MODULUS)
            .unwrap();
        let expected = hex("30820122300d06092a864886f70d01010105000382010f003082010a0282010100d547963c45b6b1d5a29d583ae5426641e986f830154e61667fa59f281fb0b80b45d189f160d61973d153cc167eea432ffc8fe35ff8ed872aee9c5a047fb5766adbb0ac6bce6ade5858dedda4ed1e0364dc9ce1b4ae1d9fd5d04be19a1f32a2ecfc91776c0dee3253be27ec281dbb6d0abcfc7070dbaae93e7216995448056c12ab45bc961083121a6f37819c95c2771012ac9467af29cc0423456fc0f079b6b471d09b6be88c5008471a8777a73379e2e9f1229269f65434b1431814306c7f2806f94c8ce0cc466281db5542b932b58bb0a310771787c84a63d8006a418aedc0dd4caf184a76df2a1cec470d14680c8682e40586907a35a85c2402c0f242a4eb0203010001");
        assert_eq!(spki_rsa(&n, &[1, 0, 1]), expected);
        let p384 = "046e893802f39441eb33c9e98f71b76da8952c06f206a73952e11591a158d00aebddf9cfa2b2d7102890577466f74f2a078b884ec845b001f611c82b45ffc2908798728637536a43c60904be28dca6fc1ef659618bf1023e9007dfeb60de862005";
        assert_eq!(
            spki_ec(&hex(p384), true),
            hex(&format!("3076301006072a8648ce3d020106052b81040022036200{p384}"))
        );
        let p256 = "0472384e2be5f356d29d1853093829bcb6d5bd100fba663197c4c1afd1f529f417b26af34e47e4c1cdc0096dcfe3e4791cbf1875ddfbac6b3b4c75ac2348415997";
        assert_eq!(
            spki_ec(&hex(p256), false),
            hex(&format!(
                "3059301306072a8648ce3d020106082a8648ce3d03010703420004{}",
                &p256[2..]
            ))
        );
    }

    #[test]
    fn ecdsa_signatures_become_der_sequences() {
        let mut raw = vec![0u8; 64];
        raw[31] = 1; // r = 1
        raw[32] = 0x80; // s has its high bit set: a leading zero keeps it positive
        let der = ecdsa_der(&raw, 32).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 0x21, 0x00]);
        assert_eq!(der.len(), 2 + 3 + 3 + 32);
        assert!(ecdsa_der(&raw[..63], 32).is_none());
    }

    #[test]
    fn arguments_and_results_are_protobuf() {
        let args = encode_arguments("sha256", &[1, 2], &[3; 200], b"t");
        assert_eq!(&args[..8], &[0x0a, 6, b's', b'h', b'a', b'2', b'5', b'6']);
        assert_eq!(&args[8..12], &[0x12, 2, 1, 2]);
        assert_eq!(&args[12..15], &[0x1a, 0xc8, 0x01], "varint length 200");
        assert_eq!(decode_result(&[0x08, 0x01]), Some(true));
        assert_eq!(decode_result(&[]), Some(false));
        assert_eq!(decode_result(&[0x12, 3, b'b', b'a', b'd']), Some(false));
        assert_eq!(decode_result(&[0x08]), None);
        assert_eq!(decode_result(&[0x12, 9, b'x']), None);
        assert_eq!(decode_result(&[0x99, 1]), None);
    }
}

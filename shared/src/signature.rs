//! Signed webhook bodies: `sha256=<hex HMAC-SHA256 of the body>`, the form GitHub sends in
//! `X-Hub-Signature-256` and the approval broker sends in `X-Orch-Signature`.

use ring::hmac;

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`. The
/// comparison takes the same time wherever the first difference is.
pub fn verify(secret: &str, body: &[u8], header: Option<&str>) -> bool {
    let Some(hex) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Some(tag) = decode_hex(hex) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, body, &tag).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_under_its_secret_and_body_only() {
        // RFC 4231 test case 2: key "Jefe".
        let s = sign("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify("Jefe", b"what do ya want for nothing?", Some(&s)));
        assert!(!verify("jefe", b"what do ya want for nothing?", Some(&s)));
        assert!(!verify("Jefe", b"what do ya want for nothing!", Some(&s)));
        assert!(!verify("Jefe", b"x", None));
        assert!(!verify("Jefe", b"x", Some("sha256=zz")));
        assert!(!verify("Jefe", b"x", Some("sha1=00")));
    }
}

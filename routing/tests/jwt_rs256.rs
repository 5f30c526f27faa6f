//! RS256-signed JWTs: the claim is the key when the signature verifies; a token signed by
//! another key, or tampered with, is refused. (The key pair is a test-only fixture.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cellgate_routing::{JwtVerify, KeyError, KeySource, KeySources};
use http::{HeaderMap, HeaderValue, Uri};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const PRIV: &[u8] = include_bytes!("keys/rs256-test.key");
const PUB: &[u8] = include_bytes!("keys/rs256-test.pub");

fn token(claims: &serde_json::Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, key).unwrap()
}

fn extract(sources: &KeySources, auth: &str) -> Result<Option<String>, KeyError> {
    let uri: Uri = "/".parse().unwrap();
    let mut h = HeaderMap::new();
    h.insert("authorization", HeaderValue::from_str(auth).unwrap());
    sources.extract(&uri, &h).map(|k| k.map(|k| k.into_owned()))
}

#[test]
fn rs256_tokens_are_verified() {
    let sources = KeySources::new(vec![KeySource::jwt(
        "Authorization",
        "sub",
        JwtVerify::Rs256Pem(PUB),
    )
    .unwrap()]);
    let enc = EncodingKey::from_rsa_pem(PRIV).unwrap();
    let good = token(&serde_json::json!({"sub": "user-rs"}), &enc);
    assert_eq!(
        extract(&sources, &format!("Bearer {good}"))
            .unwrap()
            .as_deref(),
        Some("user-rs")
    );

    // Tampered payload: signature no longer matches.
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_payload = token(&serde_json::json!({"sub": "admin"}), &enc);
    let forged_payload = forged_payload.split('.').nth(1).unwrap().to_owned();
    parts[1] = &forged_payload;
    let tampered = parts.join(".");
    assert!(matches!(
        extract(&sources, &format!("Bearer {tampered}")),
        Err(KeyError::Jwt(_))
    ));

    // HS256 token presented to an RS256 source: refused (no algorithm confusion).
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "x"}),
        &EncodingKey::from_secret(PUB),
    )
    .unwrap();
    assert!(matches!(
        extract(&sources, &format!("Bearer {hs}")),
        Err(KeyError::Jwt(_))
    ));

    // Expired token: refused.
    let expired = token(
        &serde_json::json!({"sub": "old", "exp": 1_000_000_000}),
        &enc,
    );
    assert!(matches!(
        extract(&sources, &format!("Bearer {expired}")),
        Err(KeyError::Jwt(_))
    ));

    assert!(KeySource::jwt("Authorization", "sub", JwtVerify::Rs256Pem(b"not a pem")).is_err());
}

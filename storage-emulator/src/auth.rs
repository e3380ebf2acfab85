//! The server's JWT check: every object route needs an `authorization` header with a JWT signed
//! by the project's secret. The service role bypasses row-level security; any other role (anon)
//! sees no rows, so a bulk delete with an anon key deletes nothing and answers `200 []`.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Service,
    Other,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Empty: no role claim at all (a hand-made key); storage treats it like anon.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    role: String,
    iss: String,
    exp: u64,
}

/// Checks the `authorization` header as the real server does (errors are HTTP 400 with the real
/// status in the body).
pub fn authorize(header: Option<&str>, secret: &str) -> Result<Role, ApiError> {
    let Some(header) = header else {
        return Err(ApiError::new(
            400,
            "400",
            "Error",
            "InvalidRequest",
            "headers must have required property 'authorization'",
        ));
    };
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or(header)
        .trim();
    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    match decode::<serde_json::Value>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    ) {
        Ok(data) => Ok(
            if data.claims.get("role").and_then(|r| r.as_str()) == Some("service_role") {
                Role::Service
            } else {
                Role::Other
            },
        ),
        Err(e) => {
            use jsonwebtoken::errors::ErrorKind;
            let message = match e.kind() {
                ErrorKind::InvalidSignature => "signature verification failed".to_string(),
                ErrorKind::ExpiredSignature => "\"exp\" claim timestamp check failed".to_string(),
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => "Invalid Compact JWS".to_string(),
                other => format!("{other:?}"),
            };
            Err(ApiError::new(
                400,
                "403",
                "Unauthorized",
                "AccessDenied",
                &message,
            ))
        }
    }
}

/// Mints a key for `role` ("service_role", "anon", or "" for none) signed with `secret`, valid for ten years,
/// like the keys a Supabase project hands out.
pub fn mint(role: &str, secret: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 10 * 365 * 86_400;
    let claims = Claims {
        role: role.to_string(),
        iss: "supabase".into(),
        exp,
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

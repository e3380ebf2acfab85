//! The service-role key. It opens every object in the project, so it never appears in a log
//! line, an error message or a `Debug` print: `Debug` says `ServiceKey(REDACTED)` and there is
//! no `Display`. Only [`ServiceKey::expose`] hands out the text, to build request headers.

use base64::Engine;

#[derive(Clone)]
pub struct ServiceKey(String);

impl std::fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceKey(REDACTED)")
    }
}

impl ServiceKey {
    pub fn new(key: String) -> ServiceKey {
        ServiceKey(key.trim().to_string())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A JWT (`header.payload.signature`) goes in `Authorization: Bearer` as well as `apikey`;
    /// the new opaque `sb_secret_...` keys go in `apikey` only.
    pub fn is_jwt(&self) -> bool {
        self.0.split('.').count() == 3 && !self.0.starts_with("sb_")
    }

    /// An opaque secret key as new projects issue them.
    pub fn is_secret_key(&self) -> bool {
        self.0.starts_with("sb_secret_")
    }

    /// An opaque publishable key: the new projects' counterpart of the anon key.
    pub fn is_publishable_key(&self) -> bool {
        self.0.starts_with("sb_publishable_")
    }

    /// The `role` claim of a JWT key, read without verifying the signature (the server does
    /// that). `None` for opaque keys or unreadable payloads.
    pub fn jwt_role(&self) -> Option<String> {
        if !self.is_jwt() {
            return None;
        }
        let payload = self.0.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        claims.get("role")?.as_str().map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = ServiceKey::new("eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.sig".into());
        assert_eq!(format!("{key:?}"), "ServiceKey(REDACTED)");
        assert_eq!(format!("{:?}", Some(&key)), "Some(ServiceKey(REDACTED))");
    }

    #[test]
    fn reads_the_role_claim() {
        let key = ServiceKey::new("eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYW5vbiJ9.sig".into());
        assert_eq!(key.jwt_role().as_deref(), Some("anon"));
        assert!(key.is_jwt());
        let opaque = ServiceKey::new("sb_secret_abc".into());
        assert!(!opaque.is_jwt());
        assert_eq!(opaque.jwt_role(), None);
    }
}

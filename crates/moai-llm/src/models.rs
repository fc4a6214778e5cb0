//! The model allowlist. The original proxy forwarded whatever model a client named, on the
//! server's key; here a request names one of the allowed models, or none and gets the default.

use crate::config::{ConfigError, ORIGINAL_DEFAULT_MODEL};
use crate::error::LlmError;

#[derive(Debug, Clone)]
pub struct ModelPolicy {
    allowed: Vec<String>,
    default: String,
}

impl ModelPolicy {
    /// `models` is the allowlist (blank entries and duplicates dropped). Empty: the default
    /// model alone. `default`: None takes the first allowed model, or the original service's
    /// default when the list is empty; a default outside a non-empty list is refused.
    pub fn new(models: &[String], default: Option<&str>) -> Result<Self, ConfigError> {
        let mut allowed: Vec<String> = Vec::new();
        for m in models.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
            if !allowed.iter().any(|a| a == m) {
                allowed.push(m.to_owned());
            }
        }
        let default = default.map(str::trim).filter(|d| !d.is_empty());
        let default = match (default, allowed.first()) {
            (Some(d), _) if allowed.is_empty() || allowed.iter().any(|a| a == d) => d.to_owned(),
            (Some(d), _) => return Err(ConfigError::DefaultNotAllowed(d.to_owned())),
            (None, Some(first)) => first.clone(),
            (None, None) => ORIGINAL_DEFAULT_MODEL.to_owned(),
        };
        if allowed.is_empty() {
            allowed.push(default.clone());
        }
        Ok(Self { allowed, default })
    }

    /// The model to ask the upstream for: the requested one if allowed, the default if none.
    pub fn resolve(&self, requested: Option<&str>) -> Result<&str, LlmError> {
        match requested {
            None => Ok(&self.default),
            Some(m) => self
                .allowed
                .iter()
                .find(|a| a.as_str() == m)
                .map(String::as_str)
                .ok_or_else(|| LlmError::ModelNotAllowed { requested: truncate(m, 200) }),
        }
    }

    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    pub fn default_model(&self) -> &str {
        &self.default
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (error messages echo client input).
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn without_a_list_only_the_default_is_allowed() {
        let p = ModelPolicy::new(&[], None).unwrap();
        assert_eq!(p.default_model(), ORIGINAL_DEFAULT_MODEL);
        assert_eq!(p.allowed(), [ORIGINAL_DEFAULT_MODEL]);
        assert_eq!(p.resolve(None).unwrap(), ORIGINAL_DEFAULT_MODEL);
        assert!(matches!(p.resolve(Some("gpt-4o")), Err(LlmError::ModelNotAllowed { .. })));

        let p = ModelPolicy::new(&[], Some("m1")).unwrap();
        assert_eq!(p.allowed(), ["m1"]);
    }

    #[test]
    fn the_default_is_the_first_allowed_or_must_be_allowed() {
        let p = ModelPolicy::new(&list(&["a", " b ", "", "a"]), None).unwrap();
        assert_eq!(p.allowed(), ["a", "b"]);
        assert_eq!(p.resolve(None).unwrap(), "a");
        assert_eq!(p.resolve(Some("b")).unwrap(), "b");
        assert!(p.resolve(Some("c")).is_err());
        assert_eq!(ModelPolicy::new(&list(&["a", "b"]), Some("b")).unwrap().resolve(None).unwrap(), "b");
        assert_eq!(ModelPolicy::new(&list(&["a"]), Some("z")).unwrap_err(), ConfigError::DefaultNotAllowed("z".into()));
    }

    #[test]
    fn a_refusal_echoes_a_bounded_model_name() {
        let p = ModelPolicy::new(&[], None).unwrap();
        let long = "é".repeat(300);
        let LlmError::ModelNotAllowed { requested } = p.resolve(Some(&long)).unwrap_err() else { panic!() };
        assert!(requested.len() <= 200);
    }
}

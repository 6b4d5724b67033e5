//! Stage 2: reject requests that can never become atoms.

use crate::atom::AtomIngestionRequest;
use crate::flow::{FnStage, Item};
use crate::outcome::{Outcome, Rejection};
use super::spec::ValidateSpec;

/// Text types must be UTF-8 and are embedded; other allowed types are only stored.
pub fn is_text(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    base.starts_with("text/") || matches!(base.as_str(), "application/json" | "application/xml" | "application/x-ndjson" | "application/yaml")
}

pub fn check(spec: &ValidateSpec, req: &AtomIngestionRequest) -> Result<(), Rejection> {
    let base = req.content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if !spec.allowed_content_types.iter().any(|t| t.eq_ignore_ascii_case(&base)) {
        return Err(Rejection::new(
            "validate.content_type",
            format!("content type `{}` is not allowed (allowed: {})", req.content_type, spec.allowed_content_types.join(", ")),
        ));
    }
    if req.content.is_empty() {
        return Err(Rejection::new("validate.empty", "content is empty"));
    }
    if req.content.len() > spec.max_content_bytes {
        return Err(Rejection::new(
            "validate.too_large",
            format!("content is {} bytes; the limit is {}", req.content.len(), spec.max_content_bytes),
        ));
    }
    if is_text(&base) {
        if let Err(e) = std::str::from_utf8(&req.content) {
            return Err(Rejection::new("validate.utf8", format!("{} content is not valid UTF-8: {e}", req.content_type)));
        }
    }
    Ok(())
}

pub fn stage(spec: ValidateSpec) -> FnStage<AtomIngestionRequest, AtomIngestionRequest, impl FnMut(Item<AtomIngestionRequest>) -> Outcome<AtomIngestionRequest> + Send> {
    FnStage::new(move |item: Item<AtomIngestionRequest>| match check(&spec, &item.value) {
        Ok(()) => Outcome::Continue(item.value),
        Err(r) => Outcome::Invalid(r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ct: &str, content: &[u8]) -> AtomIngestionRequest {
        AtomIngestionRequest {
            content_type: ct.into(),
            content: content.to_vec(),
            metadata: Default::default(),
            source_system: "s".into(),
            correlation_id: "c".into(),
            created_at_ms: None,
        }
    }

    #[test]
    fn each_rule_has_its_reason_code() {
        let spec = ValidateSpec { max_content_bytes: 8, ..ValidateSpec::default() };
        assert!(check(&spec, &req("text/plain", b"hello")).is_ok());
        assert!(check(&spec, &req("text/plain; charset=utf-8", b"hello")).is_ok());
        assert_eq!(check(&spec, &req("image/png", b"x")).unwrap_err().code, "validate.content_type");
        assert_eq!(check(&spec, &req("text/plain", b"")).unwrap_err().code, "validate.empty");
        assert_eq!(check(&spec, &req("text/plain", b"123456789")).unwrap_err().code, "validate.too_large");
        assert_eq!(check(&spec, &req("text/plain", &[0xff, 0xfe])).unwrap_err().code, "validate.utf8");
    }

    #[test]
    fn binary_types_skip_the_utf8_rule() {
        let spec = ValidateSpec { allowed_content_types: vec!["application/octet-stream".into()], ..ValidateSpec::default() };
        assert!(check(&spec, &req("application/octet-stream", &[0xff, 0xfe])).is_ok());
        assert!(!is_text("application/octet-stream"));
        assert!(is_text("application/json"));
        assert!(is_text("TEXT/Plain; charset=utf-8") && is_text("Application/JSON"), "media types are case-insensitive");
    }
}

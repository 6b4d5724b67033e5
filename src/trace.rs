//! W3C trace context (`traceparent`): read from an input record's Kafka
//! header, carried to every event a topology produces (their headers), to
//! every row it stores (`trace_id` columns), and to every HTTP call it makes
//! for the record (model and embedding servers).
//!
//! A record without a valid `traceparent` starts no trace: its rows get an
//! empty `trace_id` and its calls no header. Hartonomous does not invent
//! trace ids, so a replay of the same input stores the same rows.
//!
//! HTTP clients do not take the context as an argument: the stage that
//! makes a call for a record runs it [`within`] that record's context, and
//! the client asks for [`outgoing`] when it builds the request (the way
//! OpenTelemetry's context travels with a future). A call shared by several
//! records (an embedding batch, a coalesced model call) carries the context
//! of the record it was made for first.

use std::future::Future;

/// A parsed `traceparent`: version 00, 16-byte trace id, 8-byte parent span
/// id, flags, all as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: String,
    span_id: String,
    flags: String,
}

impl TraceParent {
    /// Parses a header value; `None` when it is malformed or an all-zero id
    /// (invalid by the W3C rules).
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(version, 2) || version.eq_ignore_ascii_case("ff") || !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(Self { trace_id: trace_id.to_ascii_lowercase(), span_id: span_id.to_ascii_lowercase(), flags: flags.to_ascii_lowercase() })
    }

    /// The context of a record's `traceparent` header bytes, if valid.
    pub fn of_header(value: Option<&[u8]>) -> Option<Self> {
        std::str::from_utf8(value?).ok().and_then(Self::parse)
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The same trace, with a new span id: what a call made on behalf of
    /// this context sends, so the callee's span is a child of ours.
    pub fn child(&self) -> Self {
        let span: u64 = rand::random::<u64>().max(1);
        Self { trace_id: self.trace_id.clone(), span_id: format!("{span:016x}"), flags: self.flags.clone() }
    }

    /// The OpenTelemetry form, for span links.
    pub fn span_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let flags = u8::from_str_radix(&self.flags, 16).ok()?;
        Some(SpanContext::new(
            TraceId::from_hex(&self.trace_id).ok()?,
            SpanId::from_hex(&self.span_id).ok()?,
            TraceFlags::new(flags),
            true,
            TraceState::default(),
        ))
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// The trace id of a `traceparent` header value, or empty when there is
/// none or it is malformed (the `trace_id` column's value).
pub fn trace_id(traceparent: Option<&str>) -> String {
    traceparent.and_then(TraceParent::parse).map(|t| t.trace_id).unwrap_or_default()
}

tokio::task_local! {
    static CURRENT: Option<TraceParent>;
}

/// Runs `f` with `context` as the current trace context of its calls.
pub async fn within<F: Future>(context: Option<TraceParent>, f: F) -> F::Output {
    CURRENT.scope(context, f).await
}

/// The `traceparent` an outgoing call made now should send: a child of the
/// current context, or `None` outside any.
pub fn outgoing() -> Option<String> {
    CURRENT.try_with(|c| c.as_ref().map(|t| t.child().header())).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn only_valid_headers_parse() {
        let t = TraceParent::parse(TP).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.header(), TP);
        assert_eq!(TraceParent::parse(&TP.to_uppercase()).unwrap().header(), TP);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xbf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(trace_id(Some(TP)), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id(Some("garbage")), "");
        assert_eq!(trace_id(None), "");
    }

    #[tokio::test]
    async fn calls_inside_a_context_send_a_child_of_it() {
        assert_eq!(outgoing(), None, "no context outside `within`");
        let sent = within(TraceParent::parse(TP), async { outgoing() }).await.unwrap();
        let child = TraceParent::parse(&sent).unwrap();
        assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(sent, TP, "a new span id");
        assert_eq!(within(None, async { outgoing() }).await, None);
    }
}

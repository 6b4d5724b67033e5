//! Error classification: the one place where `clickhouse` crate errors and
//! server error codes become [`StoreError`]s, and the deadline of each request.

use std::future::Future;
use std::time::Duration;

use crate::outcome::{ErrorClass, error_chain};
use crate::store::StoreError;

/// Most characters of a server message kept in an error.
const MAX_MESSAGE_CHARS: usize = 2_000;

/// ClickHouse server error codes the store knows, with their names and how
/// it treats them. Codes not listed are fatal: ClickHouse itself marks only a
/// short list of codes as retryable (`X-ClickHouse-Exception-Retryable`).
const SERVER_CODES: &[(u32, &str, ErrorClass)] = &[
    // Retry: the server, the network or the load may recover.
    (3, "UNEXPECTED_END_OF_FILE", ErrorClass::Retry),
    (32, "ATTEMPT_TO_READ_AFTER_EOF", ErrorClass::Retry),
    (33, "CANNOT_READ_ALL_DATA", ErrorClass::Retry),
    (159, "TIMEOUT_EXCEEDED", ErrorClass::Retry),
    (160, "TOO_SLOW", ErrorClass::Retry),
    (173, "CANNOT_ALLOCATE_MEMORY", ErrorClass::Retry),
    (201, "QUOTA_EXCEEDED", ErrorClass::Retry),
    (202, "TOO_MANY_SIMULTANEOUS_QUERIES", ErrorClass::Retry),
    (203, "NO_FREE_CONNECTION", ErrorClass::Retry),
    (209, "SOCKET_TIMEOUT", ErrorClass::Retry),
    (210, "NETWORK_ERROR", ErrorClass::Retry),
    (225, "NO_ZOOKEEPER", ErrorClass::Retry),
    (236, "ABORTED", ErrorClass::Retry),
    (241, "MEMORY_LIMIT_EXCEEDED", ErrorClass::Retry),
    (242, "TABLE_IS_READ_ONLY", ErrorClass::Retry),
    (243, "NOT_ENOUGH_SPACE", ErrorClass::Retry),
    (252, "TOO_MANY_PARTS", ErrorClass::Retry),
    (285, "TOO_FEW_LIVE_REPLICAS", ErrorClass::Retry),
    (286, "UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE", ErrorClass::Retry),
    (319, "UNKNOWN_STATUS_OF_INSERT", ErrorClass::Retry),
    (373, "SESSION_IS_LOCKED", ErrorClass::Retry),
    (394, "QUERY_WAS_CANCELLED", ErrorClass::Retry),
    (425, "SYSTEM_ERROR", ErrorClass::Retry),
    (439, "CANNOT_SCHEDULE_TASK", ErrorClass::Retry),
    (473, "DEADLOCK_AVOIDED", ErrorClass::Retry),
    (999, "KEEPER_EXCEPTION", ErrorClass::Retry),
    (1002, "UNKNOWN_EXCEPTION", ErrorClass::Retry),
    // Invalid: the data sent cannot be stored.
    (6, "CANNOT_PARSE_TEXT", ErrorClass::Invalid),
    (25, "CANNOT_PARSE_ESCAPE_SEQUENCE", ErrorClass::Invalid),
    (26, "CANNOT_PARSE_QUOTED_STRING", ErrorClass::Invalid),
    (27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", ErrorClass::Invalid),
    (38, "CANNOT_PARSE_DATE", ErrorClass::Invalid),
    (41, "CANNOT_PARSE_DATETIME", ErrorClass::Invalid),
    (53, "TYPE_MISMATCH", ErrorClass::Invalid),
    (69, "ARGUMENT_OUT_OF_BOUND", ErrorClass::Invalid),
    (70, "CANNOT_CONVERT_TYPE", ErrorClass::Invalid),
    (72, "CANNOT_PARSE_NUMBER", ErrorClass::Invalid),
    (117, "INCORRECT_DATA", ErrorClass::Invalid),
    (128, "TOO_LARGE_ARRAY_SIZE", ErrorClass::Invalid),
    (130, "CANNOT_READ_ARRAY_FROM_TEXT", ErrorClass::Invalid),
    (131, "TOO_LARGE_STRING_SIZE", ErrorClass::Invalid),
    (190, "SIZES_OF_ARRAYS_DOESNT_MATCH", ErrorClass::Invalid),
    (321, "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE", ErrorClass::Invalid),
    (349, "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN", ErrorClass::Invalid),
    (407, "DECIMAL_OVERFLOW", ErrorClass::Invalid),
    (469, "VIOLATED_CONSTRAINT", ErrorClass::Invalid),
    // Fatal: the schema, the query or the credentials are wrong.
    (8, "THERE_IS_NO_COLUMN", ErrorClass::Fatal),
    (10, "NOT_FOUND_COLUMN_IN_BLOCK", ErrorClass::Fatal),
    (16, "NO_SUCH_COLUMN_IN_TABLE", ErrorClass::Fatal),
    (20, "NUMBER_OF_COLUMNS_DOESNT_MATCH", ErrorClass::Fatal),
    (36, "BAD_ARGUMENTS", ErrorClass::Fatal),
    (42, "NUMBER_OF_ARGUMENTS_DOESNT_MATCH", ErrorClass::Fatal),
    (43, "ILLEGAL_TYPE_OF_ARGUMENT", ErrorClass::Fatal),
    (44, "ILLEGAL_COLUMN", ErrorClass::Fatal),
    (46, "UNKNOWN_FUNCTION", ErrorClass::Fatal),
    (47, "UNKNOWN_IDENTIFIER", ErrorClass::Fatal),
    (48, "NOT_IMPLEMENTED", ErrorClass::Fatal),
    (50, "UNKNOWN_TYPE", ErrorClass::Fatal),
    (57, "TABLE_ALREADY_EXISTS", ErrorClass::Fatal),
    (60, "UNKNOWN_TABLE", ErrorClass::Fatal),
    (62, "SYNTAX_ERROR", ErrorClass::Fatal),
    (73, "UNKNOWN_FORMAT", ErrorClass::Fatal),
    (81, "UNKNOWN_DATABASE", ErrorClass::Fatal),
    (82, "DATABASE_ALREADY_EXISTS", ErrorClass::Fatal),
    (115, "UNKNOWN_SETTING", ErrorClass::Fatal),
    (164, "READONLY", ErrorClass::Fatal),
    (192, "UNKNOWN_USER", ErrorClass::Fatal),
    (193, "WRONG_PASSWORD", ErrorClass::Fatal),
    (194, "REQUIRED_PASSWORD", ErrorClass::Fatal),
    (195, "IP_ADDRESS_NOT_ALLOWED", ErrorClass::Fatal),
    (291, "DATABASE_ACCESS_DENIED", ErrorClass::Fatal),
    (497, "ACCESS_DENIED", ErrorClass::Fatal),
    (516, "AUTHENTICATION_FAILED", ErrorClass::Fatal),
];

/// The name and class of a server error code, if the store knows it.
pub fn server_code_class(code: u32) -> Option<(&'static str, ErrorClass)> {
    SERVER_CODES.iter().find(|(c, _, _)| *c == code).map(|&(_, name, class)| (name, class))
}

/// The `Code: N` of a ClickHouse exception message, in either the 18.16 form
/// (`Code: 60, e.displayText() = DB::Exception: ...`) or the current one
/// (`Code: 60. DB::Exception: ... (UNKNOWN_TABLE) (version ...)`).
pub fn server_error_code(message: &str) -> Option<u32> {
    let start = message.find("Code: ")? + "Code: ".len();
    let digits: String = message[start..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Classifies an error from the `clickhouse` crate. This and
/// [`classify_server_message`] are the only places where ClickHouse errors
/// get a class:
///
/// | error | class |
/// | --- | --- |
/// | `Network` (refused, reset, DNS), `TimedOut`, `Compression`, `Decompression`, `Other` (I/O underneath) | `Unavailable` |
/// | `Network` with a rejected server certificate (unknown CA, expired, wrong host name) | `Fatal`, naming `ca_file` |
/// | `Network` where the peer does not speak TLS (an `https://` url on a plain-HTTP port) | `Fatal` |
/// | `BadResponse` (the server answered with an error) | by [`classify_server_message`] |
/// | `InvalidParams` (bad URL or bind), `Unsupported` (e.g. a scheme the client cannot speak) | `Fatal` |
/// | row (de)serialization errors (`NotEnoughData`, `Custom`, `SchemaMismatch`, ...) | `Fatal`: the row layout does not match the table |
///
/// A request that runs past `request_timeout_ms` is `Unavailable` too (see
/// [`ClickHouseStore`](super::ClickHouseStore)).
pub fn classify(context: &str, error: &clickhouse::error::Error) -> StoreError {
    use clickhouse::error::Error as E;
    let message = format!("{context}: {}", error_chain(error));
    match error {
        E::BadResponse(body) => classify_server_message(context, body),
        E::Network(inner) => {
            if let Some(tls) = crate::tls::certificate_error(inner.as_ref()) {
                StoreError::Fatal(format!(
                    "{context}: the server's TLS certificate is not trusted ({tls}); set ca_file to the PEM file of \
                     the CA that signed it, or fix the server certificate (it must name the url's host)"
                ))
            } else if let Some(tls) = crate::tls::not_tls_error(inner.as_ref()) {
                StoreError::Fatal(format!(
                    "{context}: the server does not speak TLS on this port ({tls}); point an https:// url at \
                     the server's https_port, or use http://"
                ))
            } else {
                StoreError::Unavailable(message)
            }
        }
        E::TimedOut | E::Compression(_) | E::Decompression(_) | E::Other(_) => StoreError::Unavailable(message),
        E::InvalidParams(_) | E::Unsupported(_) => StoreError::Fatal(message),
        E::RowNotFound
        | E::SequenceMustHaveLength
        | E::DeserializeAnyNotSupported
        | E::NotEnoughData
        | E::InvalidUtf8Encoding(_)
        | E::InvalidTagEncoding(_)
        | E::VariantDiscriminatorIsOutOfBound(_)
        | E::Custom(_)
        | E::DataFormat(_)
        | E::InvalidColumnsHeader(_)
        | E::SchemaMismatch(_) => StoreError::Fatal(format!(
            "{message} (the row layout does not match the table: run migrate, and check the table was not altered)"
        )),
        _ => StoreError::Fatal(message),
    }
}

/// Classifies the text of an error response from the server:
///
/// - with a `Code: N`, by the code ([`server_code_class`]; unknown codes are fatal):
///   retry for e.g. TOO_MANY_PARTS (252), TIMEOUT_EXCEEDED (159),
///   MEMORY_LIMIT_EXCEEDED (241), TABLE_IS_READ_ONLY (242), NETWORK_ERROR (210);
///   row rejected for data errors (CANNOT_PARSE_*, TYPE_MISMATCH 53,
///   ARGUMENT_OUT_OF_BOUND 69, TOO_LARGE_STRING_SIZE 131, ...); fatal for
///   UNKNOWN_TABLE (60), UNKNOWN_DATABASE (81), UNKNOWN_IDENTIFIER (47),
///   NO_SUCH_COLUMN_IN_TABLE (16), SYNTAX_ERROR (62), READONLY (164),
///   UNKNOWN_USER (192), WRONG_PASSWORD (193), AUTHENTICATION_FAILED (516), ...;
/// - without a code (a proxy or a bare HTTP status): `408`, `429` and `5xx`
///   are retryable, other `4xx` fatal, anything else (an HTML error page)
///   retryable.
pub fn classify_server_message(context: &str, body: &str) -> StoreError {
    let body = truncate(body.trim(), MAX_MESSAGE_CHARS);
    match server_error_code(&body) {
        Some(code) => match server_code_class(code) {
            Some((name, class)) => {
                let message = format!("{context}: [{name}] {body}");
                match class {
                    ErrorClass::Retry => StoreError::Unavailable(message),
                    ErrorClass::Invalid => StoreError::RowRejected(message),
                    ErrorClass::Fatal => StoreError::Fatal(message),
                }
            }
            None => StoreError::Fatal(format!("{context}: {body}")),
        },
        None => {
            let message = format!("{context}: {body}");
            let status: Option<u16> = body.get(..3).filter(|s| s.bytes().all(|b| b.is_ascii_digit())).and_then(|s| s.parse().ok());
            match status {
                Some(408 | 429) => StoreError::Unavailable(message),
                Some(400..=499) => StoreError::Fatal(message),
                _ => StoreError::Unavailable(message),
            }
        }
    }
}

pub(super) fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}… ({} more bytes)", &s[..i], s.len() - i),
        None => s.to_string(),
    }
}

/// Runs one request with the store's deadline.
pub(super) async fn timed<T>(timeout: Duration, context: &str, request: impl Future<Output = clickhouse::error::Result<T>>) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(classify(context, &e)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "{context}: no answer from ClickHouse within {} ms (request_timeout_ms)",
            timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error as E;

    type Expect = fn(&StoreError) -> bool;

    fn is_unavailable(e: &StoreError) -> bool {
        matches!(e, StoreError::Unavailable(_))
    }
    fn is_rejected(e: &StoreError) -> bool {
        matches!(e, StoreError::RowRejected(_))
    }
    fn is_fatal(e: &StoreError) -> bool {
        matches!(e, StoreError::Fatal(_))
    }

    /// Error bodies exactly as ClickHouse 18.16.1 (Debian) returned them over
    /// HTTP on this machine, with the class each must get.
    const OBSERVED_18_16: &[(&str, Expect)] = &[
        ("Code: 60, e.displayText() = DB::Exception: Table t1.nope doesn't exist., e.what() = DB::Exception", is_fatal),
        ("Code: 81, e.displayText() = DB::Exception: Database nodb doesn't exist, e.what() = DB::Exception", is_fatal),
        ("Code: 47, e.displayText() = DB::Exception: Unknown identifier: nocol, e.what() = DB::Exception", is_fatal),
        ("Code: 192, e.displayText() = DB::Exception: Unknown user nouser, e.what() = DB::Exception", is_fatal),
        ("Code: 193, e.displayText() = DB::Exception: Wrong password for user pwuser, e.what() = DB::Exception", is_fatal),
        ("Code: 16, e.displayText() = DB::Exception: No such column nocol in table atoms, e.what() = DB::Exception", is_fatal),
        (
            "Code: 62, e.displayText() = DB::Exception: Syntax error: failed at position 1: SELEC 1. Expected one of: SYSTEM query, SELECT subquery, DESC, e.what() = DB::Exception",
            is_fatal,
        ),
        ("Code: 164, e.displayText() = DB::Exception: Cannot insert into table in readonly mode, e.what() = DB::Exception", is_fatal),
        ("Code: 46, e.displayText() = DB::Exception: Unknown function currentUser, e.what() = DB::Exception", is_fatal),
        (
            "Code: 42, e.displayText() = DB::Exception: Number of arguments for function arrayElement doesn't match: passed 3, should be 2, e.what() = DB::Exception",
            is_fatal,
        ),
        (
            "Code: 53, e.displayText() = DB::Exception: Type mismatch in IN or VALUES section. Expected: UInt64. Got: String, e.what() = DB::Exception",
            is_rejected,
        ),
        (
            "Code: 27, e.displayText() = DB::Exception: Cannot parse input: expected \\n before: notanumber: (at row 1)\n\nRow 1:\nColumn 0,   name: content_hash, type: String, parsed text: \"a\"\nColumn 1,   name: content_size, type: UInt64, ERROR: text \"notanumber\" is not like UInt64\n\n, e.what() = DB::Exception",
            is_rejected,
        ),
        (
            "Code: 41, e.displayText() = DB::Exception: Cannot parse datetime: Cannot parse DateTime from String, e.what() = DB::Exception",
            is_rejected,
        ),
        ("Code: 131, e.displayText() = DB::Exception: String too long for type FixedString(2), e.what() = DB::Exception", is_rejected),
        (
            "Code: 241, e.displayText() = DB::Exception: Memory limit (for query) exceeded: would use 2.00 MiB (attempt to allocate chunk of 4096 bytes), maximum: 976.56 KiB, e.what() = DB::Exception",
            is_unavailable,
        ),
        (
            "Code: 159, e.displayText() = DB::Exception: Timeout exceeded: elapsed 1.999999943 seconds, maximum: 1, e.what() = DB::Exception",
            is_unavailable,
        ),
        (
            "Code: 252, e.displayText() = DB::Exception: Too many parts (1). Merges are processing significantly slower than inserts., e.what() = DB::Exception",
            is_unavailable,
        ),
    ];

    /// The same failures from ClickHouse 26.9 (the engine in the `chdb`
    /// package, run on this machine), which uses the current message form.
    const OBSERVED_26_9: &[(&str, Expect)] = &[
        (
            "Code: 60. DB::Exception: Unknown table expression identifier 'h.nope'. Maybe you meant system.one? In scope SELECT * FROM h.nope. (UNKNOWN_TABLE)",
            is_fatal,
        ),
        (
            "Code: 47. DB::Exception: Unknown expression identifier `nocol`. In scope SELECT nocol FROM h.atoms. (UNKNOWN_IDENTIFIER)",
            is_fatal,
        ),
        ("Code: 81. DB::Exception: Database nodb does not exist. (UNKNOWN_DATABASE)", is_fatal),
        (
            "Code: 6. DB::Exception: Cannot parse string 'x' as UInt64: syntax error at begin of string. Note: there are toUInt64OrZero and toUInt64OrNull functions, which returns zero/NULL instead of throwing exception: While executing ValuesBlockInputFormat. (CANNOT_PARSE_TEXT)",
            is_rejected,
        ),
        (
            "Code: 131. DB::Exception: String too long for type FixedString(2): In scope SELECT toFixedString('abcdef', 2). (TOO_LARGE_STRING_SIZE)",
            is_rejected,
        ),
        (
            "Code: 41. DB::Exception: Cannot read DateTime: unexpected word: Cannot parse DateTime from String: In scope SELECT toDateTime('abc'). (CANNOT_PARSE_DATETIME)",
            is_rejected,
        ),
        (
            "Code: 241. DB::Exception: Query memory limit exceeded: would use 5.06 MiB (attempt to allocate chunk of 5.00 MiB), maximum: 976.56 KiB: While executing AggregatingTransform. (MEMORY_LIMIT_EXCEEDED)",
            is_unavailable,
        ),
        ("Code: 159. DB::Exception: Timeout exceeded: elapsed 1000.962 ms, maximum: 1000.000 ms. (TIMEOUT_EXCEEDED)", is_unavailable),
    ];

    #[test]
    fn server_messages_observed_on_18_16_and_26_9_are_classified() {
        for (body, expected) in OBSERVED_18_16.iter().chain(OBSERVED_26_9) {
            let error = classify("test", &E::BadResponse((*body).to_string()));
            assert!(expected(&error), "{body} -> {error:?}");
            assert!(error.to_string().contains(body.lines().next().unwrap()), "message kept: {error}");
        }
    }

    #[test]
    fn error_codes_parse_in_both_message_forms() {
        assert_eq!(server_error_code("Code: 60, e.displayText() = DB::Exception: x"), Some(60));
        assert_eq!(server_error_code("Code: 252. DB::Exception: Too many parts (TOO_MANY_PARTS)"), Some(252));
        assert_eq!(server_error_code("Code: 516"), Some(516));
        assert_eq!(server_error_code("503 Service Unavailable"), None);
        assert_eq!(server_error_code("Code: x"), None);
    }

    #[test]
    fn classifier_table_matches_the_brief() {
        let class = |code| server_code_class(code).map(|(_, c)| c);
        for code in [252, 159, 209, 210, 241, 242, 202, 3, 319, 425, 999] {
            assert_eq!(class(code), Some(ErrorClass::Retry), "code {code}");
        }
        for code in [6, 27, 38, 41, 53, 69, 72, 131, 128, 469] {
            assert_eq!(class(code), Some(ErrorClass::Invalid), "code {code}");
        }
        for code in [60, 81, 516, 192, 193, 47, 16, 62, 164, 497] {
            assert_eq!(class(code), Some(ErrorClass::Fatal), "code {code}");
        }
        // Every code appears once.
        let mut codes: Vec<u32> = SERVER_CODES.iter().map(|(c, _, _)| *c).collect();
        codes.sort_unstable();
        let n = codes.len();
        codes.dedup();
        assert_eq!(codes.len(), n);
        // Unknown codes stop rather than retry forever.
        assert!(is_fatal(&classify_server_message("x", "Code: 4242. DB::Exception: something new")));
        // A code only in the header (the crate's form when the body is empty).
        assert!(is_fatal(&classify("x", &E::BadResponse("Code: 516".into()))));
        assert!(is_unavailable(&classify("x", &E::BadResponse("Code: 252".into()))));
    }

    #[test]
    fn responses_without_a_code_are_classified_by_status() {
        assert!(is_unavailable(&classify_server_message("x", "503 Service Unavailable")));
        assert!(is_unavailable(&classify_server_message("x", "502 Bad Gateway")));
        assert!(is_unavailable(&classify_server_message("x", "429 Too Many Requests")));
        assert!(is_unavailable(&classify_server_message("x", "408 Request Timeout")));
        assert!(is_fatal(&classify_server_message("x", "401 Unauthorized")));
        assert!(is_fatal(&classify_server_message("x", "404 Not Found")));
        assert!(is_unavailable(&classify_server_message("x", "<html><body>upstream connect error</body></html>")));
    }

    #[test]
    fn crate_errors_are_classified() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert!(is_unavailable(&classify("x", &E::Network(Box::new(refused)))));
        assert!(is_unavailable(&classify("x", &E::TimedOut)));
        assert!(is_unavailable(&classify("x", &E::Decompression("bad lz4".into()))));
        assert!(is_fatal(&classify("x", &E::InvalidParams("relative URL without a base".into()))));
        assert!(is_fatal(&classify("x", &E::Unsupported("invalid URL, scheme is not http".into()))));
        assert!(is_fatal(&classify("x", &E::NotEnoughData)));
        assert!(is_fatal(&classify("x", &E::SchemaMismatch("column count".into()))));
        let network = classify("insert", &E::Network(Box::new(std::io::Error::other("client error (Connect)"))));
        assert!(network.to_string().contains("insert: network error"), "{network}");
    }

    #[test]
    fn long_server_messages_are_truncated() {
        let body = format!("Code: 62, e.displayText() = DB::Exception: Syntax error: {}", "x".repeat(10_000));
        let error = classify_server_message("q", &body);
        assert!(is_fatal(&error));
        assert!(error.to_string().len() < 2_200, "{}", error.to_string().len());
        assert!(error.to_string().contains("more bytes"));
    }
}

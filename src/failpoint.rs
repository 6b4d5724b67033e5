//! Crash points for the fault tests: `HARTONOMOUS_FAILPOINT=<name>[@<n>]`
//! makes the process abort (`std::process::abort`, as abrupt as `kill -9`:
//! no destructor, no flush, no commit) the `n`-th time (default 1) it passes
//! the named point. Only tests set the variable; when it is unset every
//! [`hit`] is one relaxed atomic load.
//!
//! The points sit on the boundaries that decide what a crash may lose:
//!
//! | name | where |
//! |---|---|
//! | `persist.after_insert` | after the store acknowledged a window's atom insert, before its arrivals and events |
//! | `persist.after_arrivals` | after the arrivals of a window are stored, before its events |
//! | `publish.after_ack` | after the broker acknowledged a window's events, before the offsets are marked done |
//! | `dead_letter.after_write` | after a window's dead letters are acknowledged, before its offsets are marked done |
//! | `commit.before` | just before offsets are committed |
//! | `announce.before_send` | compensation: step 2 (`announcing`) recorded, `InferenceCompensated` not sent |
//! | `announce.after_send` | compensation: `InferenceCompensated` acknowledged, step 3 not recorded |
//!
//! One point is not a crash but a wedge ([`fires`]): `consumer.wedge@<n>` makes
//! the Kafka consumer, once it has handed out `n` polls' worth of records,
//! pause its partitions inside librdkafka behind the runner's back (a
//! desynchronised pause, the kind confluentinc/librdkafka#1849 describes), so
//! they stop fetching while the runner believes they flow. The runner's stall
//! watch must find and restart them (`LogConsumer::unstick`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms a failpoint.
pub const ENV: &str = "HARTONOMOUS_FAILPOINT";

/// Every failpoint, so that a typo in a test fails loudly instead of never firing.
pub const NAMES: &[&str] = &[
    "persist.after_insert",
    "persist.after_arrivals",
    "publish.after_ack",
    "dead_letter.after_write",
    "commit.before",
    "announce.before_send",
    "announce.after_send",
    "consumer.wedge",
];

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (name, at) = match spec.split_once('@') {
                Some((n, k)) => (n.trim().to_string(), k.trim().parse().unwrap_or_else(|_| panic!("{ENV}={spec}: `{k}` is not a count"))),
                None => (spec.trim().to_string(), 1),
            };
            assert!(NAMES.contains(&name.as_str()), "{ENV}={spec}: unknown failpoint `{name}`; known: {NAMES:?}");
            Some(Armed { name, at, seen: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Aborts the process if `name` is armed and this is the armed pass.
pub fn hit(name: &'static str) {
    debug_assert!(NAMES.contains(&name), "unlisted failpoint {name}");
    if let Some(a) = armed()
        && a.name == name
        && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at
    {
        eprintln!("failpoint {name} (pass {}): aborting", a.at);
        std::process::abort();
    }
}

/// Whether `name` is armed and this is the armed pass: for the points that
/// change behaviour instead of aborting.
pub fn fires(name: &'static str) -> bool {
    debug_assert!(NAMES.contains(&name), "unlisted failpoint {name}");
    armed().is_some_and(|a| a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at)
}

/// The environment variable that makes a store write refuse chosen rows, as a
/// store that rejects a row would: `HARTONOMOUS_REFUSE=<point>:<text>` refuses
/// at `<point>` every row whose key contains `<text>` (for the saga tests;
/// only tests set it). Points: `persist.result` (an inference result row,
/// keyed by correlation id).
pub const REFUSE_ENV: &str = "HARTONOMOUS_REFUSE";

/// Every refusal point.
pub const REFUSALS: &[&str] = &["persist.result"];

/// Whether the write at `point` of the row keyed `key` is to be refused.
pub fn refuses(point: &'static str, key: &str) -> bool {
    static ARMED: OnceLock<Option<(String, String)>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var(REFUSE_ENV).ok()?;
        let (name, text) = spec.split_once(':').unwrap_or_else(|| panic!("{REFUSE_ENV}={spec}: use <point>:<text>"));
        assert!(REFUSALS.contains(&name), "{REFUSE_ENV}={spec}: unknown point `{name}`; known: {REFUSALS:?}");
        Some((name.to_string(), text.to_string()))
    });
    armed.as_ref().is_some_and(|(name, text)| name == point && key.contains(text.as_str()))
}

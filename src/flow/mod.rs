//! The record-flow core shared by every topology.
//!
//! One record's path, one file per hop:
//! 1. [`runner`] polls the log, admits records against the in-flight budget
//!    (pausing partitions when it is spent) and cuts them into windows;
//! 2. [`window`] closes a micro-batch on count, bytes or age;
//! 3. [`stage`] tasks, joined by bounded edges, run the topology's stages in
//!    order, some with bounded concurrency;
//! 4. the acker in [`runner`] writes dead letters through [`crate::dead_letter`],
//!    waits for their acknowledgement, and marks offsets done in [`commit`];
//! 5. [`commit`] yields the highest contiguous offset per partition, which the
//!    runner commits.

pub mod batch;
pub mod commit;
pub mod metrics;
pub mod runner;
pub mod stage;
pub mod window;

pub use batch::{Batch, Item, Slot};
pub use metrics::{Counter, Metrics};
pub use stage::{FnStage, Stage};

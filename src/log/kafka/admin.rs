//! Topic administration: [`ensure_topics`] creates the missing topics and
//! waits until the broker's metadata lists them.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::error::{classify, with_context};
use super::{KafkaConfig, LogContext};
use crate::log::LogError;

/// Bound on the admin calls and on waiting for new topics to appear in metadata.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates the topics that do not exist yet (`(name, partitions)`), with
/// `config.replication_factor`, and returns once the broker's metadata
/// lists every one of them. Topics that exist already are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[(&str, i32)]) -> Result<(), LogError> {
    if topics.is_empty() {
        return Ok(());
    }
    if let Some((t, p)) = topics.iter().find(|(t, p)| t.trim().is_empty() || *p < 1) {
        return Err(LogError::Fatal(format!("cannot create topic `{t}` with {p} partitions; name it and give it at least 1 partition")));
    }
    let admin: AdminClient<LogContext> = config
        .client_config()?
        .create_with_context(LogContext { name: "admin" })
        .map_err(|e| with_context(classify(&e), "creating the kafka admin client"))?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(config.replication_factor))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
    let results = tokio::time::timeout(ADMIN_TIMEOUT + Duration::from_secs(5), admin.create_topics(&new, &opts))
        .await
        .map_err(|_| LogError::Unavailable(format!("creating topics timed out after {} s", ADMIN_TIMEOUT.as_secs())))?
        .map_err(|e| with_context(classify(&e), "creating topics"))?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(with_context(classify(&KafkaError::AdminOp(code)), &format!("creating topic `{name}`"))),
        }
    }
    // Wait until the metadata shows them, so that clients created next do not
    // see "unknown topic".
    let admin = Arc::new(admin);
    let names: Vec<String> = topics.iter().map(|(t, _)| t.to_string()).collect();
    let deadline = tokio::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        let (a, n) = (admin.clone(), names.clone());
        let missing = tokio::task::spawn_blocking(move || -> Result<Vec<String>, KafkaError> {
            let md = a.inner().fetch_metadata(None, Duration::from_secs(5))?;
            Ok(n.into_iter()
                .filter(|t| !md.topics().iter().any(|m| m.name() == t && m.error().is_none() && !m.partitions().is_empty()))
                .collect())
        })
        .await
        .map_err(|e| LogError::Fatal(format!("metadata task failed: {e}")))?;
        match missing {
            Ok(m) if m.is_empty() => return Ok(()),
            Ok(m) if tokio::time::Instant::now() >= deadline => {
                return Err(LogError::Unavailable(format!(
                    "topics {m:?} were created but are not in the broker's metadata after {} s",
                    ADMIN_TIMEOUT.as_secs()
                )));
            }
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(with_context(classify(&e), "reading metadata")),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

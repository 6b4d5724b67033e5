//! Error classification: the one place where librdkafka errors become
//! [`LogError`]s, and which commit errors `commit` retries by itself.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::log::LogError;

/// The one place where librdkafka errors become [`LogError`]s:
/// - broker, network and coordinator trouble that passes by itself → `Unavailable`;
/// - a record the broker will never take (too large, invalid) → `Rejected`;
/// - authentication, authorisation, unknown topics, invalid configuration,
///   fatal client states → `Fatal`.
///
/// Codes not listed are treated as transient: retrying is the safe default.
pub fn classify(e: &KafkaError) -> LogError {
    use RDKafkaErrorCode as C;
    let msg = e.to_string();
    if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
        return LogError::Fatal(msg);
    }
    let Some(code) = e.rdkafka_error_code() else {
        return match e {
            KafkaError::Canceled | KafkaError::NoMessageReceived | KafkaError::PartitionEOF(_) => LogError::Unavailable(msg),
            // Configuration, client creation, subscription, NUL bytes, pause/seek on unknown partitions.
            _ => LogError::Fatal(msg),
        };
    };
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidRecord
        | C::MessageBatchTooLarge
        | C::InvalidTimestamp
        | C::BadMessage
        | C::BadCompression
        | C::KeySerialization
        | C::ValueSerialization
        | C::UnsupportedForMessageFormat => LogError::Rejected(msg),
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::SSL
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::InvalidTopic
        | C::TopicDeletionDisabled
        | C::InvalidConfig
        | C::InvalidArgument
        | C::InvalidGroupId
        | C::InvalidSessionTimeout
        | C::InvalidReplicationFactor
        | C::InvalidPartitions
        | C::InvalidReplicaAssignment
        | C::InvalidRequiredAcks
        | C::InvalidRequest
        | C::InconsistentGroupProtocol
        | C::UnsupportedAssignor
        | C::UnsupportedVersion
        | C::UnsupportedFeature
        | C::UnsupportedCompressionType
        | C::NotImplemented
        | C::NotConfigured
        | C::SecurityDisabled
        | C::PolicyViolation
        | C::GroupMaxSizeReached
        | C::FencedInstanceId
        | C::ProducerFenced
        | C::Fenced
        | C::Fatal
        | C::Conflict
        | C::ExistingSubscription
        | C::InvalidType => LogError::Fatal(msg),
        _ => LogError::Unavailable(msg),
    }
}

/// Commit errors that go away without a poll, so `commit` retries them itself.
pub(super) fn commit_retriable(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::CoordinatorLoadInProgress
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::RequestTimedOut
                | C::RebalanceInProgress
                | C::WaitingForCoordinator
                | C::TimedOutQueue
                | C::OperationTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
        )
    )
}

pub(super) fn with_context(e: LogError, context: &str) -> LogError {
    match e {
        LogError::Unavailable(m) => LogError::Unavailable(format!("{context}: {m}")),
        LogError::Rejected(m) => LogError::Rejected(format!("{context}: {m}")),
        LogError::Fatal(m) => LogError::Fatal(format!("{context}: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_fall_into_the_three_classes() {
        use RDKafkaErrorCode as C;
        let class = |e: KafkaError| match classify(&e) {
            LogError::Unavailable(_) => "retry",
            LogError::Rejected(_) => "invalid",
            LogError::Fatal(_) => "fatal",
        };
        assert_eq!(class(KafkaError::MessageProduction(C::MessageSizeTooLarge)), "invalid");
        assert_eq!(class(KafkaError::MessageProduction(C::InvalidRecord)), "invalid");
        assert_eq!(class(KafkaError::MessageProduction(C::MessageTimedOut)), "retry");
        assert_eq!(class(KafkaError::MessageProduction(C::QueueFull)), "retry");
        assert_eq!(class(KafkaError::MessageConsumption(C::BrokerTransportFailure)), "retry");
        assert_eq!(class(KafkaError::MessageConsumption(C::AllBrokersDown)), "retry");
        assert_eq!(class(KafkaError::ConsumerCommit(C::RebalanceInProgress)), "retry");
        assert_eq!(class(KafkaError::MessageConsumption(C::UnknownTopicOrPartition)), "fatal");
        assert_eq!(class(KafkaError::Global(C::SaslAuthenticationFailed)), "fatal");
        assert_eq!(class(KafkaError::MessageConsumption(C::TopicAuthorizationFailed)), "fatal");
        assert_eq!(class(KafkaError::MessageConsumptionFatal(C::BrokerTransportFailure)), "fatal");
        assert_eq!(class(KafkaError::ClientCreation("bad".into())), "fatal");
    }
}

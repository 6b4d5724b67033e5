//! Schema registries: the [`SchemaRegistry`] contract and [`FileRegistry`],
//! the file-backed implementation used by the embedded default.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use apache_avro::Schema;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::Schemas;
use super::wire::{SchemaProblem, WireError};
use crate::outcome::{Classify, ErrorClass};

/// Why a registry call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No schema has this id. For a consumer this is a property of the
    /// record (reason `decode.unknown_schema`), not of the registry.
    #[error("schema id {0} is not registered")]
    UnknownId(u32),
    /// The registry could not be reached, read or written (I/O, network).
    /// Possibly transient.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The registry's content or the request is unusable: a corrupt registry
    /// file, a stored schema that does not parse, an unknown bundled schema
    /// name, a registry that is not one or refuses access. Retrying will not
    /// help, and every record would fail the same way: fatal.
    #[error("schema registry error: {0}")]
    Invalid(String),
    /// Schema `id` exists but cannot be decoded with: a JSON or Protobuf
    /// schema, an Avro schema with references, Avro text that does not
    /// parse. Like [`RegistryError::UnknownId`], a property of the records
    /// that carry this id (reason [`SchemaProblem::code`]), not of the
    /// registry: they are dead-lettered and processing goes on.
    #[error("{message}")]
    Unusable { id: u32, problem: SchemaProblem, message: String },
}

impl RegistryError {
    /// Stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::UnknownId(_) => "decode.unknown_schema",
            RegistryError::Unavailable(_) => "registry.unavailable",
            RegistryError::Invalid(_) => "registry.invalid",
            RegistryError::Unusable { problem, .. } => problem.code(),
        }
    }
}

impl Classify for RegistryError {
    fn class(&self) -> ErrorClass {
        match self {
            RegistryError::UnknownId(_) | RegistryError::Unusable { .. } => ErrorClass::Invalid,
            RegistryError::Unavailable(_) => ErrorClass::Retry,
            RegistryError::Invalid(_) => ErrorClass::Fatal,
        }
    }
}

/// A schema registry: ids ↔ schemas, schemas grouped by subject.
///
/// Contract, shared by every implementation (the embedded [`FileRegistry`]
/// and a Confluent HTTP client):
///
/// - **`schema_by_id`** returns the writer schema registered under `id`, or
///   [`RegistryError::UnknownId`] if there is none, or
///   [`RegistryError::Unusable`] if the schema under `id` cannot be used to
///   decode. An id, once assigned, always names the same schema, so callers
///   may cache a schema forever; negative answers may be cached briefly (an
///   id may be registered later).
/// - **`register`** is register-or-lookup. If `schema` (compared by Parsing
///   Canonical Form, [`Schema::canonical_form`]) is already registered under
///   `subject` it returns the existing id and changes nothing; otherwise it
///   adds it as the subject's next version and returns its id. A schema
///   already known under another subject keeps its global id.
/// - Subjects follow `TopicNameStrategy` (`<topic>-value`, see
///   [`Schemas::subject`]). Registration does not check compatibility;
///   compatible evolution is the job of the bundled schemas and their tests.
/// - Failures to reach or update the registry are
///   [`RegistryError::Unavailable`] (retry); a registry that is unusable as a
///   whole (corrupt, not a registry, refusing access) is
///   [`RegistryError::Invalid`] (fatal); one schema that cannot be decoded
///   with is [`RegistryError::Unusable`] (invalid: its records are
///   dead-lettered).
///
/// Methods return boxed futures so the trait is dyn-compatible
/// (`Arc<dyn SchemaRegistry>`). The futures borrow only `self`:
/// implementations copy what they need from `subject` and `schema` before
/// returning.
pub trait SchemaRegistry: Send + Sync {
    /// The schema registered under `id`.
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Arc<Schema>, RegistryError>>;

    /// Registers `schema` under `subject`, or finds it; returns its id.
    fn register(&self, subject: &str, schema: &Schema)
    -> BoxFuture<'_, Result<u32, RegistryError>>;
}

/// A framed message that failed to decode: either the record is bad
/// ([`DecodeError::Invalid`], dead-letter it with [`WireError::code`]), or
/// the registry failed ([`DecodeError::Registry`], classified by the
/// registry), or the decoder could not run ([`DecodeError::Unavailable`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Invalid(#[from] WireError),
    #[error(transparent)]
    Registry(RegistryError),
    /// The thread that decodes deeply nested data could not be started (the
    /// process is out of threads or memory): transient, retry.
    #[error("decoder unavailable: {0}")]
    Unavailable(String),
}

impl DecodeError {
    /// Stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Invalid(e) => e.code(),
            DecodeError::Registry(e) => e.code(),
            DecodeError::Unavailable(_) => "decode.unavailable",
        }
    }
}

impl From<RegistryError> for DecodeError {
    /// An unknown or unusable id is the record's fault; anything else is
    /// the registry's.
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownId(id) => DecodeError::Invalid(WireError::UnknownSchema(id)),
            RegistryError::Unusable { id, problem, message } => DecodeError::Invalid(WireError::UnusableSchema { id, problem, message }),
            other => DecodeError::Registry(other),
        }
    }
}

impl Classify for DecodeError {
    fn class(&self) -> ErrorClass {
        match self {
            DecodeError::Invalid(e) => e.class(),
            DecodeError::Registry(e) => e.class(),
            DecodeError::Unavailable(_) => ErrorClass::Retry,
        }
    }
}

pub use super::decoder::decode_message;

/// One registered (subject, version) and its schema.
#[derive(Debug, Clone)]
pub struct RegisteredSchema {
    pub id: u32,
    pub subject: String,
    /// Version within the subject, from 1 in registration order.
    pub version: u32,
    pub schema: Arc<Schema>,
}

/// What [`FileRegistry::register_bundled`] registered for one bundled version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundledRegistration {
    pub topic: String,
    pub subject: String,
    /// Bundled schema name, e.g. `AtomIngestionRequest`.
    pub name: &'static str,
    /// Bundle version (`vN` in the file name).
    pub bundle_version: u32,
    pub id: u32,
}

/// On-disk form of the registry file.
#[derive(Debug, Serialize, Deserialize)]
struct RegistryFile {
    /// Layout version of this file, currently 1.
    format: u32,
    entries: Vec<Entry>,
}

const FILE_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: u32,
    subject: String,
    version: u32,
    /// Full schema JSON (logical types, defaults and docs kept); identity is
    /// its canonical form, computed on load.
    schema: String,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    /// id → parsed schema, shared by every entry with that id.
    schemas: HashMap<u32, Arc<Schema>>,
    /// canonical form → id.
    ids: HashMap<String, u32>,
    /// Canonical form of each entry, parallel to `entries`.
    canonical: Vec<String>,
    /// The file's modification time and length when it was last read or
    /// written, so a look-up re-reads it only when it changed.
    seen: Option<(std::time::SystemTime, u64)>,
}

impl State {
    fn find(&self, subject: &str, canonical: &str) -> Option<u32> {
        self.entries
            .iter()
            .zip(&self.canonical)
            .find(|(e, c)| e.subject == subject && c.as_str() == canonical)
            .map(|(e, _)| e.id)
    }

    /// Adds an entry, checking it against everything already loaded.
    fn insert(&mut self, entry: Entry, schema: Arc<Schema>) -> Result<(), String> {
        let canonical = schema.canonical_form();
        match self.ids.get(&canonical) {
            Some(&id) if id != entry.id => {
                return Err(format!(
                    "subject {} version {} has id {} but the same schema already has id {id}",
                    entry.subject, entry.version, entry.id
                ));
            }
            None if self.schemas.contains_key(&entry.id) => {
                return Err(format!("id {} names two different schemas", entry.id));
            }
            _ => {}
        }
        if self.entries.iter().any(|e| e.subject == entry.subject && e.version == entry.version) {
            return Err(format!("subject {} has version {} twice", entry.subject, entry.version));
        }
        if self.find(&entry.subject, &canonical).is_some() {
            return Err(format!("subject {} holds the same schema twice", entry.subject));
        }
        self.ids.insert(canonical.clone(), entry.id);
        self.schemas.entry(entry.id).or_insert(schema);
        self.canonical.push(canonical);
        self.entries.push(entry);
        Ok(())
    }

    fn next_id(&self) -> u32 {
        self.entries.iter().map(|e| e.id).max().unwrap_or(0) + 1
    }

    fn next_version(&self, subject: &str) -> u32 {
        self.entries.iter().filter(|e| e.subject == subject).map(|e| e.version).max().unwrap_or(0)
            + 1
    }
}

/// A schema registry kept in one JSON file, for the embedded default.
///
/// The file holds entries `{id, subject, version, schema}`. Ids start at 1
/// and are assigned as max + 1; every registration is written to disk before
/// it returns (to a temporary file that is synced and then renamed over the
/// old one, so a crash leaves either the old or the new file, never half of
/// one). Reopening the file yields the same ids, in this process or another.
///
/// Parsed schemas are cached in memory and all access goes through a mutex,
/// so one `FileRegistry` may be shared between threads. Processes may share
/// the file too (an ingestion processor and a compensation consumer on one
/// machine): a registration takes an exclusive lock on `<file>.lock` and
/// re-reads the file under it before choosing an id, so two processes never
/// hand out one id for two schemas, and neither overwrites the other's
/// entries. A look-up of an id this process has not seen re-reads the file
/// when it changed since the last read, so an id another process registered
/// is found, not dead-lettered as unknown.
pub struct FileRegistry {
    path: PathBuf,
    state: Mutex<State>,
}

impl FileRegistry {
    /// Opens the registry stored at `path`, or an empty one if the file does
    /// not exist yet (it is created on first registration, along with its
    /// parent directory).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RegistryError> {
        let path = path.as_ref().to_path_buf();
        let mut state = State::default();
        reload(&path, &mut state)?;
        Ok(Self { path, state: Mutex::new(state) })
    }

    /// Takes the exclusive lock that serialises registrations across
    /// processes; it is released when the returned file is dropped.
    fn lock_file(&self) -> Result<fs::File, RegistryError> {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".lock");
        let lock_path = self.path.with_file_name(name);
        let io = |e: std::io::Error| RegistryError::Unavailable(format!("locking {}: {e}", lock_path.display()));
        if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io)?;
        file.lock().map_err(io)?;
        Ok(file)
    }

    /// Where this registry is stored.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema registered under `id` (synchronous form of
    /// [`SchemaRegistry::schema_by_id`]).
    pub fn get(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        let mut state = self.lock();
        if let Some(schema) = state.schemas.get(&id) {
            return Ok(schema.clone());
        }
        // Another process may have registered it since this one last read.
        reload(&self.path, &mut state)?;
        state.schemas.get(&id).cloned().ok_or(RegistryError::UnknownId(id))
    }

    /// Registers or finds `schema` under `subject` (synchronous form of
    /// [`SchemaRegistry::register`]).
    pub fn register_schema(&self, subject: &str, schema: &Schema) -> Result<u32, RegistryError> {
        let canonical = schema.canonical_form();
        let mut state = self.lock();
        if let Some(id) = state.find(subject, &canonical) {
            return Ok(id);
        }
        // Ids are chosen from the file as it is now, under the lock, and the
        // lock is held until the new file is in place.
        let _held = self.lock_file()?;
        reload(&self.path, &mut state)?;
        if let Some(id) = state.find(subject, &canonical) {
            return Ok(id);
        }
        let (id, parsed) = match state.ids.get(&canonical) {
            Some(&id) => (id, state.schemas[&id].clone()),
            None => (state.next_id(), Arc::new(schema.clone())),
        };
        let json = serde_json::to_string(schema)
            .map_err(|e| RegistryError::Invalid(format!("cannot serialise schema: {e}")))?;
        let entry = Entry {
            id,
            subject: subject.to_string(),
            version: state.next_version(subject),
            schema: json,
        };
        // Write the new file first; memory changes only once it is on disk.
        let mut entries = state.entries.clone();
        entries.push(entry.clone());
        persist(&self.path, &entries)?;
        state.insert(entry, parsed).map_err(RegistryError::Invalid)?;
        state.seen = file_stamp(&self.path);
        Ok(id)
    }

    /// Registers `schema` under `subject` with the id another registry gave
    /// it (a replay's writer schemas keep their recorded ids). A no-op when
    /// the id already holds this schema; an error when it holds another one.
    pub fn import(&self, id: u32, subject: &str, schema: &Schema) -> Result<(), RegistryError> {
        let canonical = schema.canonical_form();
        let mut state = self.lock();
        let _held = self.lock_file()?;
        reload(&self.path, &mut state)?;
        if let Some(existing) = state.schemas.get(&id) {
            if existing.canonical_form() == canonical {
                return Ok(());
            }
            return Err(RegistryError::Invalid(format!("id {id} already names another schema in {}", self.path.display())));
        }
        if let Some(other) = state.ids.get(&canonical) {
            return Err(RegistryError::Invalid(format!("this schema is registered as id {other} already, not {id}")));
        }
        let json = serde_json::to_string(schema).map_err(|e| RegistryError::Invalid(format!("cannot serialise schema: {e}")))?;
        let entry = Entry { id, subject: subject.to_string(), version: state.next_version(subject), schema: json };
        let mut entries = state.entries.clone();
        entries.push(entry.clone());
        persist(&self.path, &entries)?;
        state.insert(entry, Arc::new(schema.clone())).map_err(RegistryError::Invalid)?;
        state.seen = file_stamp(&self.path);
        Ok(())
    }

    /// Every registration, in the order it was made.
    pub fn list(&self) -> Vec<RegisteredSchema> {
        let state = self.lock();
        state
            .entries
            .iter()
            .map(|e| RegisteredSchema {
                id: e.id,
                subject: e.subject.clone(),
                version: e.version,
                schema: state.schemas[&e.id].clone(),
            })
            .collect()
    }

    /// Registers every bundled version of each schema, oldest first, under
    /// `<topic>-value`, so that data written with any bundled version has an
    /// id. `topic_to_schema` pairs a topic with a bundled schema name, e.g.
    /// `("atoms.requests", "AtomIngestionRequest")`. Idempotent.
    pub fn register_bundled(
        &self,
        topic_to_schema: &[(&str, &str)],
    ) -> Result<Vec<BundledRegistration>, RegistryError> {
        let mut out = Vec::new();
        for &(topic, name) in topic_to_schema {
            let versions = Schemas::versions(name).ok_or_else(|| {
                RegistryError::Invalid(format!("no bundled schema named {name:?}"))
            })?;
            let subject = Schemas::subject(topic);
            for v in versions {
                let id = self.register_schema(&subject, &v.schema)?;
                out.push(BundledRegistration {
                    topic: topic.to_string(),
                    subject: subject.clone(),
                    name: v.name,
                    bundle_version: v.version,
                    id,
                });
            }
        }
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Memory is only updated after a successful write, so a panic while
        // holding the lock cannot leave it inconsistent with the file.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SchemaRegistry for FileRegistry {
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Arc<Schema>, RegistryError>> {
        Box::pin(std::future::ready(self.get(id)))
    }

    fn register(
        &self,
        subject: &str,
        schema: &Schema,
    ) -> BoxFuture<'_, Result<u32, RegistryError>> {
        Box::pin(std::future::ready(self.register_schema(subject, schema)))
    }
}

fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Replaces `state` with the file's content if the file changed since
/// `state` was read. Every registration reaches the file before memory, so
/// the file is always a superset of what this process holds. A missing file
/// is an empty registry.
fn reload(path: &Path, state: &mut State) -> Result<(), RegistryError> {
    let stamp = file_stamp(path);
    if stamp.is_some() && stamp == state.seen {
        return Ok(());
    }
    match fs::read(path) {
        Ok(bytes) => {
            *state = load(path, &bytes)?;
            state.seen = stamp;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RegistryError::Unavailable(format!("reading {}: {e}", path.display()))),
    }
}

fn load(path: &Path, bytes: &[u8]) -> Result<State, RegistryError> {
    let corrupt = |msg: String| RegistryError::Invalid(format!("{}: {msg}", path.display()));
    let file: RegistryFile =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a registry file: {e}")))?;
    if file.format != FILE_FORMAT {
        return Err(corrupt(format!("unsupported format {}", file.format)));
    }
    let mut state = State::default();
    for entry in file.entries {
        if entry.id == 0 || entry.version == 0 {
            return Err(corrupt(format!("id and version start at 1 (subject {})", entry.subject)));
        }
        let schema = Schema::parse_str(&entry.schema)
            .map_err(|e| corrupt(format!("schema id {} does not parse: {e}", entry.id)))?;
        // Entries sharing an id share one parsed schema.
        let schema = match state.schemas.get(&entry.id) {
            Some(existing) if existing.canonical_form() == schema.canonical_form() => {
                existing.clone()
            }
            _ => Arc::new(schema),
        };
        state.insert(entry, schema).map_err(corrupt)?;
    }
    Ok(state)
}

/// Writes the whole file atomically: temp file in the same directory, fsync,
/// rename over the target, fsync the directory.
fn persist(path: &Path, entries: &[Entry]) -> Result<(), RegistryError> {
    let io = |what: &str, e: std::io::Error| {
        RegistryError::Unavailable(format!("{what} {}: {e}", path.display()))
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| io("creating the directory of", e))?;
    let file = RegistryFile { format: FILE_FORMAT, entries: entries.to_vec() };
    let mut json = serde_json::to_vec_pretty(&file)
        .map_err(|e| RegistryError::Invalid(format!("cannot serialise registry: {e}")))?;
    json.push(b'\n');
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io("writing", e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io("replacing", e));
    }
    // Make the rename itself durable. Not every platform can sync a
    // directory; the file content is already safe, so ignore failures.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use apache_avro::types::Value;
    use futures::executor::block_on;

    use super::*;
    use crate::avro::wire;
    use crate::atom::AtomIngestionRequest;
    use crate::avro::{ATOM_INGESTED, ATOM_INGESTION_REQUEST, DEAD_LETTER};

    const REQUESTS: &str = "atoms.requests";

    fn v(name: &str, version: u32) -> Arc<Schema> {
        Schemas::version(name, version).unwrap().schema.clone()
    }

    fn v1_value(schema: &Schema) -> Value {
        Value::Record(vec![
            ("content_type".into(), Value::String("text/plain".into())),
            ("content".into(), Value::Bytes(b"old producer".to_vec())),
            ("metadata".into(), Value::Map([("k".to_string(), Value::String("v".into()))].into())),
            ("source_system".into(), Value::String("legacy".into())),
            ("correlation_id".into(), Value::String("c-9".into())),
        ])
        .resolve(schema)
        .unwrap()
    }

    #[test]
    fn v1_data_decodes_with_v2_reader_via_registry() {
        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        let regs = registry.register_bundled(&[(REQUESTS, ATOM_INGESTION_REQUEST)]).unwrap();
        assert_eq!(regs.len(), 2);
        assert_eq!((regs[0].bundle_version, regs[0].id), (1, 1));
        assert_eq!((regs[1].bundle_version, regs[1].id), (2, 2));
        assert_eq!(regs[0].subject, "atoms.requests-value");

        let writer = v(ATOM_INGESTION_REQUEST, 1);
        let bytes = wire::encode(regs[0].id, &writer, &v1_value(&writer)).unwrap();

        let reader = Schemas::current(ATOM_INGESTION_REQUEST).unwrap();
        let (id, value) = block_on(decode_message(&registry, &reader.schema, &bytes)).unwrap();
        assert_eq!(id, 1);
        let req: AtomIngestionRequest = apache_avro::from_value(&value).unwrap();
        assert_eq!(
            req,
            AtomIngestionRequest {
                content_type: "text/plain".into(),
                content: b"old producer".to_vec(),
                metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
                source_system: "legacy".into(),
                correlation_id: "c-9".into(),
                created_at_ms: None,
            }
        );
    }

    #[test]
    fn v2_timestamp_decodes_into_struct() {
        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        let regs = registry.register_bundled(&[(REQUESTS, ATOM_INGESTION_REQUEST)]).unwrap();
        let schema = v(ATOM_INGESTION_REQUEST, 2);
        let Value::Record(mut fields) = v1_value(&v(ATOM_INGESTION_REQUEST, 1)) else {
            unreachable!()
        };
        fields.push((
            "created_at_ms".into(),
            Value::Union(1, Box::new(Value::TimestampMillis(1_699_999_999_999))),
        ));
        let bytes = wire::encode(regs[1].id, &schema, &Value::Record(fields)).unwrap();
        // The registry round-trips the logical type: the writer schema it
        // returns still says timestamp-millis.
        let writer = registry.get(regs[1].id).unwrap();
        assert_eq!(writer.canonical_form(), schema.canonical_form());
        assert!(serde_json::to_string(&*writer).unwrap().contains("timestamp-millis"));
        let (_, value) = block_on(decode_message(&registry, &schema, &bytes)).unwrap();
        let req: AtomIngestionRequest = apache_avro::from_value(&value).unwrap();
        assert_eq!(req.created_at_ms, Some(1_699_999_999_999));
    }

    #[test]
    fn unknown_schema_id_is_invalid_record() {
        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        registry.register_bundled(&[(REQUESTS, ATOM_INGESTION_REQUEST)]).unwrap();
        let writer = v(ATOM_INGESTION_REQUEST, 1);
        let bytes = wire::encode(99, &writer, &v1_value(&writer)).unwrap();
        let reader = v(ATOM_INGESTION_REQUEST, 2);
        let err = block_on(decode_message(&registry, &reader, &bytes)).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(WireError::UnknownSchema(99)));
        assert_eq!(err.code(), "decode.unknown_schema");
        assert_eq!(err.class(), ErrorClass::Invalid);
        let direct = block_on(registry.schema_by_id(99)).unwrap_err();
        assert_eq!(direct, RegistryError::UnknownId(99));
        assert_eq!(direct.code(), "decode.unknown_schema");
    }

    #[test]
    fn unusable_schema_is_a_per_record_rejection_with_its_code() {
        let cases = [
            (SchemaProblem::NotAvro, "decode.schema_not_avro"),
            (SchemaProblem::References, "decode.schema_references"),
            (SchemaProblem::Unparsable, "decode.schema_unparsable"),
        ];
        for (problem, code) in cases {
            let e = RegistryError::Unusable { id: 5, problem, message: "schema id 5 is unusable".into() };
            assert_eq!((e.code(), e.class()), (code, ErrorClass::Invalid));
            assert_eq!(e.to_string(), "schema id 5 is unusable");
            let d = DecodeError::from(e);
            assert!(matches!(&d, DecodeError::Invalid(WireError::UnusableSchema { id: 5, .. })), "{d:?}");
            assert_eq!((d.code(), d.class()), (code, ErrorClass::Invalid));
        }
        // What shows the registry itself is wrong stays fatal.
        let d = DecodeError::from(RegistryError::Invalid("HTTP 401".into()));
        assert_eq!(d.class(), ErrorClass::Fatal);
    }

    #[test]
    fn decode_message_reports_wire_errors() {
        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        let reader = v(ATOM_INGESTION_REQUEST, 2);
        let err = block_on(decode_message(&registry, &reader, &[7, 0, 0, 0, 1])).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(WireError::BadMagic(7)));
        let err = block_on(decode_message(&registry, &reader, &[0, 0])).unwrap_err();
        assert_eq!(err.code(), "decode.truncated");
    }

    #[test]
    fn id_pointing_at_another_schema_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        let ingested_id =
            registry.register_schema("atoms.ingested-value", &v(ATOM_INGESTED, 1)).unwrap();
        let request = v(ATOM_INGESTION_REQUEST, 1);
        // Body of a request, header claiming the AtomIngested schema.
        let bytes = wire::encode(ingested_id, &request, &v1_value(&request)).unwrap();
        let err = block_on(decode_message(&registry, &v(ATOM_INGESTED, 1), &bytes)).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid(_)), "{err:?}");
        assert!(err.code().starts_with("decode."), "{}", err.code());
    }

    #[test]
    fn ids_are_stable_across_reopen_and_registration_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("registry.json");
        let topics = [(REQUESTS, ATOM_INGESTION_REQUEST), ("atoms.dlq", DEAD_LETTER)];
        let first = {
            let registry = FileRegistry::open(&path).unwrap();
            let regs = registry.register_bundled(&topics).unwrap();
            assert_eq!(regs.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2, 3]);
            // Same schema, same subject: same id, nothing added.
            assert_eq!(registry.register_bundled(&topics).unwrap(), regs);
            assert_eq!(
                block_on(registry.register("atoms.dlq-value", &v(DEAD_LETTER, 1))).unwrap(),
                3
            );
            assert_eq!(registry.list().len(), 3);
            regs
        };
        let registry = FileRegistry::open(&path).unwrap();
        assert_eq!(registry.register_bundled(&topics).unwrap(), first);
        assert_eq!(registry.list().len(), 3);
        for r in &first {
            let schema = block_on(registry.schema_by_id(r.id)).unwrap();
            let bundled = Schemas::version(r.name, r.bundle_version).unwrap();
            assert_eq!(schema.canonical_form(), bundled.schema.canonical_form());
        }
        // A new schema gets max + 1 and survives another reopen.
        let id = registry.register_schema("atoms.ingested-value", &v(ATOM_INGESTED, 1)).unwrap();
        assert_eq!(id, 4);
        drop(registry);
        let registry = FileRegistry::open(&path).unwrap();
        assert_eq!(
            registry.register_schema("atoms.ingested-value", &v(ATOM_INGESTED, 1)).unwrap(),
            4
        );
        let listed = registry.list();
        assert_eq!(
            listed.iter().map(|r| (r.id, r.subject.as_str(), r.version)).collect::<Vec<_>>(),
            vec![
                (1, "atoms.requests-value", 1),
                (2, "atoms.requests-value", 2),
                (3, "atoms.dlq-value", 1),
                (4, "atoms.ingested-value", 1),
            ]
        );
        // No temporary files left behind; the lock file stays, empty.
        let mut names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["registry.json", "registry.json.lock"]);
    }

    /// Two processes opened the file before either registered anything (an
    /// inference processor and its compensation consumer started together):
    /// each registration lands on the file as it is now, ids never collide,
    /// and each finds the other's ids.
    #[test]
    fn two_openers_of_one_file_never_share_an_id_and_see_each_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let a = FileRegistry::open(&path).unwrap();
        let b = FileRegistry::open(&path).unwrap();
        let ingested = a.register_schema("atoms.ingested-value", &v(ATOM_INGESTED, 1)).unwrap();
        let dlq = b.register_schema("atoms.dlq-value", &v(DEAD_LETTER, 1)).unwrap();
        assert_ne!(ingested, dlq);
        assert_eq!(b.get(ingested).unwrap().canonical_form(), v(ATOM_INGESTED, 1).canonical_form());
        assert_eq!(a.get(dlq).unwrap().canonical_form(), v(DEAD_LETTER, 1).canonical_form());
        // `a` registering what `b` already did finds b's id, adds nothing.
        assert_eq!(a.register_schema("atoms.dlq-value", &v(DEAD_LETTER, 1)).unwrap(), dlq);
        assert_eq!(FileRegistry::open(&path).unwrap().list().len(), 2);
        assert!(matches!(a.get(99), Err(RegistryError::UnknownId(99))));
    }

    #[test]
    fn equivalent_schema_text_is_the_same_schema() {
        let dir = tempfile::tempdir().unwrap();
        let registry = FileRegistry::open(dir.path().join("registry.json")).unwrap();
        let a = Schema::parse_str(
            r#"{"type":"record","name":"T","namespace":"x","doc":"one","fields":[{"name":"f","type":"long"}]}"#,
        )
        .unwrap();
        let b = Schema::parse_str(
            r#"{ "name": "x.T", "type": "record", "fields": [ {"type": "long", "name": "f", "doc": "d"} ] }"#,
        )
        .unwrap();
        let id = registry.register_schema("s-value", &a).unwrap();
        assert_eq!(registry.register_schema("s-value", &b).unwrap(), id);
        // Under another subject the schema keeps its global id, as version 1 there.
        assert_eq!(registry.register_schema("other-value", &b).unwrap(), id);
        let listed = registry.list();
        assert_eq!(listed.len(), 2);
        assert_eq!((listed[1].subject.as_str(), listed[1].version), ("other-value", 1));
    }

    #[test]
    fn unknown_bundled_name_and_corrupt_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let registry = FileRegistry::open(&path).unwrap();
        let err = registry.register_bundled(&[("t", "Nope")]).unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)));
        assert_eq!(err.class(), ErrorClass::Fatal);
        drop(registry);

        fs::write(&path, b"{\"format\":1,\"entries\":[").unwrap();
        assert!(matches!(FileRegistry::open(&path), Err(RegistryError::Invalid(_))));

        let schema = serde_json::to_string(&*v(DEAD_LETTER, 1)).unwrap();
        let two_ids_one_schema = serde_json::json!({"format": 1, "entries": [
            {"id": 1, "subject": "a-value", "version": 1, "schema": schema},
            {"id": 2, "subject": "b-value", "version": 1, "schema": schema},
        ]});
        fs::write(&path, two_ids_one_schema.to_string()).unwrap();
        let err = FileRegistry::open(&path).err().unwrap();
        assert!(
            matches!(&err, RegistryError::Invalid(m) if m.contains("already has id 1")),
            "{err:?}"
        );

        let bad_schema = serde_json::json!({"format": 1, "entries": [
            {"id": 1, "subject": "a-value", "version": 1, "schema": "{\"type\":\"nope\"}"},
        ]});
        fs::write(&path, bad_schema.to_string()).unwrap();
        assert!(matches!(FileRegistry::open(&path), Err(RegistryError::Invalid(_))));
    }

    #[test]
    fn failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let registry = FileRegistry::open(&path).unwrap();
        // A directory now sits where the file goes: the rename must fail.
        fs::create_dir(&path).unwrap();
        let err = registry.register_schema("s-value", &v(DEAD_LETTER, 1)).unwrap_err();
        assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
        assert_eq!(err.class(), ErrorClass::Retry);
        assert!(registry.list().is_empty());
        // An unseen id re-reads the file, which cannot be read now: retry.
        assert!(matches!(registry.get(1), Err(RegistryError::Unavailable(_))));
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["registry.json", "registry.json.lock"], "temporary file removed");
        // Once the obstacle is gone the same registration succeeds with id 1.
        fs::remove_dir(&path).unwrap();
        assert_eq!(registry.get(1).unwrap_err(), RegistryError::UnknownId(1));
        assert_eq!(registry.register_schema("s-value", &v(DEAD_LETTER, 1)).unwrap(), 1);
        assert_eq!(
            FileRegistry::open(&path).unwrap().get(1).unwrap().canonical_form(),
            v(DEAD_LETTER, 1).canonical_form()
        );
    }

    #[test]
    fn registry_is_usable_as_trait_object_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let registry: Arc<dyn SchemaRegistry> =
            Arc::new(FileRegistry::open(dir.path().join("registry.json")).unwrap());
        let schema = v(DEAD_LETTER, 1);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let registry = registry.clone();
                let schema = schema.clone();
                std::thread::spawn(move || {
                    block_on(registry.register("dlq-value", &schema)).unwrap()
                })
            })
            .collect();
        let ids: Vec<u32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ids.iter().all(|&id| id == 1), "{ids:?}");
        assert_eq!(
            block_on(registry.schema_by_id(1)).unwrap().canonical_form(),
            schema.canonical_form()
        );
    }
}

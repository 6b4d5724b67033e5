//! The Docker Compose stack (`docker-compose.yml` and `connectors/docker/`),
//! checked by reading it: no test here can start a container. Each check is
//! one way the stack could fail on a user's machine: a mounted file that does
//! not exist, a Prometheus that scrapes the wrong port or loads no rules, a
//! dashboard whose data source is not provisioned, a processor profile that
//! does not load or names a host that is not a service, a Kafka whose
//! listeners do not agree, a topology or a flag the binary does not know.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use hartonomous::config::{LogProfile, Profile, RegistryProfile, StoreProfile};
use hartonomous::ops::Listen;
use serde_yaml::Value;

/// Every service the stack runs.
const SERVICES: &[&str] = &["kafka", "schema-registry", "clickhouse", "prometheus", "grafana", "otel-collector", "hartonomous"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &Path) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {}: {e}", rel.display()))
}

fn yaml(rel: &Path) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", rel.display()))
}

fn compose() -> Value {
    yaml(Path::new("docker-compose.yml"))
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose.get("services").and_then(|s| s.get(name)).unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        None => Vec::new(),
        Some(Value::Sequence(items)) => items.iter().map(scalar).collect(),
        Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
        Some(other) => panic!("expected a list or a string, found {other:?}"),
    }
}

/// A service's `environment`, in either of its two forms (map or `K=V` list).
fn env(svc: &Value) -> BTreeMap<String, String> {
    match svc.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(m)) => m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| {
                let s = scalar(i);
                let (k, v) = s.split_once('=').unwrap_or((s.as_str(), ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Some(other) => panic!("environment is neither a map nor a list: {other:?}"),
    }
}

fn env_var(svc: &Value, name: &str, var: &str) -> String {
    env(svc).get(var).cloned().unwrap_or_else(|| panic!("service `{name}` does not set {var}"))
}

/// One entry of a service's `volumes`: a bind mount (`source` is a path
/// relative to the repository) or a named volume.
struct Mount {
    source: String,
    target: String,
    bind: bool,
}

fn mounts(svc: &Value) -> Vec<Mount> {
    let items = match svc.get("volumes") {
        None => return Vec::new(),
        Some(Value::Sequence(items)) => items,
        Some(other) => panic!("volumes is not a list: {other:?}"),
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => {
                let mut parts = s.splitn(3, ':');
                let source = parts.next().unwrap().to_string();
                let target = parts.next().unwrap_or_else(|| panic!("volume `{s}` has no target")).to_string();
                let bind = source.starts_with('.') || source.starts_with('/');
                Mount { source, target, bind }
            }
            Value::Mapping(_) => Mount {
                source: scalar(v.get("source").unwrap_or(&Value::Null)),
                target: scalar(v.get("target").unwrap_or_else(|| panic!("volume {v:?} has no target"))),
                bind: v.get("type").map(scalar).as_deref() == Some("bind"),
            },
            other => panic!("unreadable volume {other:?}"),
        })
        .collect()
}

/// The repository file bind-mounted at `target` in `svc`.
fn mounted_file(svc: &Value, name: &str, target: &str) -> PathBuf {
    let m = mounts(svc)
        .into_iter()
        .find(|m| m.bind && m.target == target)
        .unwrap_or_else(|| panic!("service `{name}` mounts nothing from the repository at {target}"));
    PathBuf::from(m.source.trim_start_matches("./"))
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `args`.
fn flag(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(String::from)
        }
    })
}

/// The container ports a service publishes, by host port.
fn published(svc: &Value) -> BTreeMap<u16, u16> {
    strings(svc.get("ports"))
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            let port = |s: &str| s.split('/').next().unwrap().parse::<u16>().unwrap_or_else(|e| panic!("port `{p}`: {e}"));
            match parts.as_slice() {
                [c] => (port(c), port(c)),
                [h, c] | [_, h, c] => (port(h), port(c)),
                _ => panic!("unreadable port mapping `{p}`"),
            }
        })
        .collect()
}

/// `(host, port)` of `scheme://host:port/...` or `host:port`.
fn host_port(addr: &str) -> (String, u16) {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next().unwrap();
    let (host, port) = authority.rsplit_once(':').unwrap_or_else(|| panic!("`{addr}` names no port"));
    (host.to_string(), port.parse().unwrap_or_else(|e| panic!("`{addr}`: port {e}")))
}

/// Kafka's `NAME://host:port,...` lists as name -> (host, port).
fn listeners(list: &str) -> BTreeMap<String, (String, u16)> {
    list.split(',').map(|l| {
        let (name, addr) = l.trim().split_once("://").unwrap_or_else(|| panic!("listener `{l}` has no NAME://"));
        (name.to_string(), host_port(addr))
    }).collect()
}

fn processor_command(compose: &Value) -> Vec<String> {
    strings(service(compose, "hartonomous").get("command"))
}

fn dockerfile_path(compose: &Value) -> PathBuf {
    let build = service(compose, "hartonomous").get("build").expect("service `hartonomous` has no `build`: it must be built from this repository");
    let (context, file) = match build {
        Value::String(c) => (c.clone(), "Dockerfile".to_string()),
        _ => (scalar(build.get("context").unwrap_or(&Value::Null)), build.get("dockerfile").map(scalar).unwrap_or_else(|| "Dockerfile".into())),
    };
    assert_eq!(context, ".", "the build context of `hartonomous` must be the repository root (the Dockerfile copies src/, topologies/, ...)");
    PathBuf::from(file)
}

/// `(source, destination)` of every `COPY` from the build context, one pair
/// per source.
fn dockerfile_copies(dockerfile: &str) -> Vec<(String, String)> {
    dockerfile
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.contains("--from="))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let (dest, sources) = words.split_last().filter(|(_, s)| !s.is_empty()).unwrap_or_else(|| panic!("unreadable `COPY {l}`"));
            sources.iter().map(|s| (s.to_string(), dest.to_string())).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_service_is_there_and_every_image_is_pinned() {
    let compose = compose();
    for name in SERVICES {
        let svc = service(&compose, name);
        match svc.get("image").map(scalar) {
            _ if svc.get("build").is_some() => {}
            Some(image) => {
                let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
                assert!(!tag.is_empty() && tag != "latest" && !tag.contains('/'), "service `{name}`: image `{image}` has no fixed tag");
            }
            None => panic!("service `{name}` has neither an image nor a build"),
        }
    }
}

#[test]
fn every_mounted_path_the_dockerfile_and_what_it_copies_exist() {
    let compose = compose();
    let declared: Vec<String> = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().map(scalar).collect())
        .unwrap_or_default();
    for name in SERVICES {
        for m in mounts(service(&compose, name)) {
            if m.bind {
                assert!(m.source.starts_with("./"), "service `{name}`: bind mount `{}` is not inside the repository (use ./...)", m.source);
                assert!(repo().join(&m.source).exists(), "service `{name}` mounts {} at {}, but it does not exist", m.source, m.target);
            } else {
                assert!(declared.contains(&m.source), "service `{name}` uses volume `{}`, which the top-level `volumes:` does not declare", m.source);
            }
        }
    }
    let dockerfile = dockerfile_path(&compose);
    assert!(dockerfile.starts_with("connectors"), "the Dockerfile {} must live under connectors/ (the top level is fixed)", dockerfile.display());
    let text = read(&dockerfile);
    // BuildKit reads `<Dockerfile>.dockerignore` next to the Dockerfile.
    let ignore_file = PathBuf::from(format!("{}.dockerignore", dockerfile.display()));
    let ignored: Vec<String> =
        read(&ignore_file).lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    assert!(ignored.iter().any(|l| l == "target"), "{} does not keep target/ out of the build context", ignore_file.display());
    for (source, _) in dockerfile_copies(&text) {
        assert!(repo().join(&source).exists(), "{} copies `{source}` from the repository, which does not exist", dockerfile.display());
        let hidden = ignored.iter().find(|i| !i.contains('*') && Path::new(&source).starts_with(i.as_str()));
        assert!(hidden.is_none(), "{} copies `{source}`, but {} leaves it out of the context", dockerfile.display(), ignore_file.display());
    }
    assert!(text.contains("\nUSER ") && !text.contains("\nUSER root"), "{} must run the processor as a non-root user", dockerfile.display());
}

#[test]
fn prometheus_loads_the_alert_rules_and_scrapes_the_processor() {
    let compose = compose();
    let prometheus = service(&compose, "prometheus");
    let args = strings(prometheus.get("command"));
    let config_path = flag(&args, "--config.file").unwrap_or_else(|| "/etc/prometheus/prometheus.yml".into());
    let config_file = mounted_file(prometheus, "prometheus", &config_path);
    let config = yaml(&config_file);

    let rules = strings(config.get("rule_files"));
    assert!(!rules.is_empty(), "{} loads no rule_files", config_file.display());
    for rule in &rules {
        let source = mounted_file(prometheus, "prometheus", rule);
        assert_eq!(source, Path::new("connectors/monitoring/prometheus/alerts.yml"), "{} loads {rule}, which is not the project's alert rules", config_file.display());
        let groups = yaml(&source).get("groups").and_then(Value::as_sequence).map_or(0, Vec::len);
        assert!(groups > 0, "{} has no rule groups", source.display());
    }

    let listen = flag(&processor_command(&compose), "--listen").expect("the processor's command has no --listen: /metrics would be on loopback only");
    let Ok(Listen::On(addr)) = listen.parse::<Listen>() else { panic!("the processor's --listen `{listen}` is not an address") };
    assert!(addr.ip().is_unspecified(), "the processor listens on {addr}: Prometheus in another container cannot reach it (use 0.0.0.0)");
    let wanted = format!("hartonomous:{}", addr.port());
    let jobs = config.get("scrape_configs").and_then(Value::as_sequence).cloned().unwrap_or_default();
    let job = jobs
        .iter()
        .find(|j| {
            j.get("static_configs").and_then(Value::as_sequence).into_iter().flatten().any(|s| strings(s.get("targets")).contains(&wanted))
        })
        .unwrap_or_else(|| panic!("{} does not scrape {wanted} (the processor's --listen port)", config_file.display()));
    let path = job.get("metrics_path").map(scalar).unwrap_or_else(|| "/metrics".into());
    assert_eq!(path, "/metrics", "{} scrapes {wanted} at {path}, not /metrics", config_file.display());
}

/// Every `datasource` reference in the dashboard JSON.
fn datasource_refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "datasource" {
                    out.push(v);
                }
                datasource_refs(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| datasource_refs(v, out)),
        _ => {}
    }
}

#[test]
fn grafana_provisions_the_dashboard_and_the_data_source_it_uses() {
    let compose = compose();
    let grafana = service(&compose, "grafana");

    let ds_dir = mounted_file(grafana, "grafana", "/etc/grafana/provisioning/datasources");
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(repo().join(&ds_dir)).unwrap() {
        let file = ds_dir.join(entry.unwrap().file_name());
        sources.extend(yaml(&file).get("datasources").and_then(Value::as_sequence).cloned().unwrap_or_default());
    }
    assert_eq!(sources.len(), 1, "{} should provision exactly one data source (Prometheus), found {}", ds_dir.display(), sources.len());
    let ds = &sources[0];
    let (ds_name, ds_uid, ds_type) = (scalar(&ds["name"]), scalar(&ds["uid"]), scalar(&ds["type"]));
    assert_eq!(ds_type, "prometheus", "the provisioned data source has type `{ds_type}`");
    let (host, port) = host_port(&scalar(&ds["url"]));
    assert!(host == "prometheus" && port == 9090, "the data source points at {host}:{port}, not the prometheus service on 9090");

    let dash_dir = mounted_file(grafana, "grafana", "/etc/grafana/provisioning/dashboards");
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(repo().join(&dash_dir)).unwrap() {
        let file = dash_dir.join(entry.unwrap().file_name());
        for p in yaml(&file).get("providers").and_then(Value::as_sequence).cloned().unwrap_or_default() {
            paths.push(scalar(&p["options"]["path"]));
        }
    }
    let dashboard_mount = mounts(grafana)
        .into_iter()
        .find(|m| m.bind && m.source == "./connectors/monitoring/grafana/hartonomous.json")
        .expect("grafana does not mount connectors/monitoring/grafana/hartonomous.json");
    assert!(
        paths.iter().any(|p| Path::new(&dashboard_mount.target).parent() == Some(Path::new(p))),
        "the dashboard is mounted at {}, but the dashboard providers read {paths:?}",
        dashboard_mount.target
    );
    if let Some(home) = env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") {
        assert_eq!(home, &dashboard_mount.target, "Grafana's home dashboard path is not where the dashboard is mounted");
    }

    let dashboard: serde_json::Value = serde_json::from_str(&read(Path::new("connectors/monitoring/grafana/hartonomous.json"))).unwrap();
    let variables: BTreeMap<String, String> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "datasource")
        .map(|v| (v["name"].as_str().unwrap().to_string(), v["query"].as_str().unwrap_or("").to_string()))
        .collect();
    let mut refs = Vec::new();
    datasource_refs(&dashboard, &mut refs);
    assert!(!refs.is_empty(), "the dashboard names no data source");
    for r in refs {
        match r {
            serde_json::Value::String(name) => assert_eq!(name, &ds_name, "the dashboard names data source `{name}`, but `{ds_name}` is provisioned"),
            serde_json::Value::Object(_) => {
                let (t, uid) = (r["type"].as_str().unwrap_or(""), r["uid"].as_str().unwrap_or(""));
                assert_eq!(t, ds_type, "the dashboard asks for a `{t}` data source, but `{ds_type}` is provisioned");
                let var = uid.strip_prefix("${").and_then(|u| u.strip_suffix('}')).or_else(|| uid.strip_prefix('$'));
                match var {
                    Some(var) => {
                        let query = variables.get(var).unwrap_or_else(|| panic!("the dashboard uses `{uid}`, which is not one of its data source variables"));
                        assert_eq!(query, &ds_type, "the dashboard's variable `{var}` lists `{query}` data sources, but the provisioned one is `{ds_type}`");
                    }
                    None => assert_eq!(uid, ds_uid, "the dashboard names data source uid `{uid}`, but the provisioned one is `{ds_uid}`"),
                }
            }
            other => panic!("unreadable datasource reference in the dashboard: {other}"),
        }
    }
}

#[test]
fn the_container_profile_loads_and_names_compose_services() {
    let compose = compose();
    let processor = service(&compose, "hartonomous");
    let command = processor_command(&compose);
    let profile_path = flag(&command, "--connectors").expect("the processor's command has no --connectors");
    let processor_env = env(processor);
    assert_eq!(
        processor_env.get("HARTONOMOUS_CONNECTORS"),
        Some(&profile_path),
        "HARTONOMOUS_CONNECTORS (used by `docker compose exec`) is not the profile the command runs with"
    );
    let dockerfile = read(&dockerfile_path(&compose));
    let source = dockerfile_copies(&dockerfile)
        .into_iter()
        .find(|(_, dest)| *dest == profile_path)
        .map(|(src, _)| src)
        .unwrap_or_else(|| panic!("the Dockerfile copies nothing to {profile_path}, the processor's --connectors"));
    assert_eq!(source, "connectors/docker/compose.toml", "the image's profile is not connectors/docker/compose.toml");

    // Loaded as the container loads it: the processor's own parser and
    // checks, with the environment the compose file gives it.
    let path = Path::new("connectors/docker/compose.toml");
    let profile = Profile::parse(path, &read(path), processor_env.clone().into_iter())
        .unwrap_or_else(|e| panic!("the container profile does not load: {e}"));

    let LogProfile::Kafka(kafka) = &profile.log else { panic!("the container profile's log is not Kafka") };
    let advertised = listeners(&env_var(service(&compose, "kafka"), "kafka", "KAFKA_ADVERTISED_LISTENERS"));
    for server in kafka.bootstrap_servers.split(',') {
        let (host, port) = host_port(server.trim());
        assert!(SERVICES.contains(&host.as_str()), "bootstrap server `{server}` is not a compose service");
        assert!(advertised.values().any(|a| *a == (host.clone(), port)), "bootstrap server `{server}` is not one of Kafka's advertised listeners {advertised:?}");
    }

    let StoreProfile::Clickhouse(store) = &profile.store else { panic!("the container profile's store is not ClickHouse") };
    let (host, port) = host_port(&store.url);
    assert_eq!(host, "clickhouse", "the store url {} does not name the clickhouse service", store.url);
    assert_eq!(port, 8123, "the store url {} is not ClickHouse's HTTP port 8123", store.url);
    let clickhouse = service(&compose, "clickhouse");
    assert_eq!(store.user, env_var(clickhouse, "clickhouse", "CLICKHOUSE_USER"), "the profile's ClickHouse user is not the one the clickhouse service creates");
    let var = store.password_env.as_ref().expect("the profile names no password_env, but the clickhouse service sets a password");
    assert_eq!(
        processor_env.get(var),
        Some(&env_var(clickhouse, "clickhouse", "CLICKHOUSE_PASSWORD")),
        "the processor's {var} (the profile's password_env) is not the clickhouse service's CLICKHOUSE_PASSWORD"
    );

    let RegistryProfile::Confluent(registry) = &profile.registry else { panic!("the container profile's registry is not the Confluent one") };
    let registry_listen = env_var(service(&compose, "schema-registry"), "schema-registry", "SCHEMA_REGISTRY_LISTENERS");
    let (_, registry_port) = host_port(&registry_listen);
    for url in &registry.url {
        assert_eq!(host_port(url), ("schema-registry".to_string(), registry_port), "the registry url {url} is not the schema-registry service on its listener {registry_listen}");
    }
}

#[test]
fn kafka_listeners_agree_with_each_other_and_with_the_clients() {
    let compose = compose();
    let kafka = service(&compose, "kafka");
    let var = |v: &str| env_var(kafka, "kafka", v);
    let bound = listeners(&var("KAFKA_LISTENERS"));
    let advertised = listeners(&var("KAFKA_ADVERTISED_LISTENERS"));
    let protocols: BTreeMap<String, String> = var("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP")
        .split(',')
        .map(|p| {
            let (n, proto) = p.split_once(':').unwrap_or_else(|| panic!("protocol map entry `{p}` has no `:`"));
            (n.to_string(), proto.to_string())
        })
        .collect();
    for name in bound.keys() {
        assert!(protocols.contains_key(name), "listener {name} has no security protocol in KAFKA_LISTENER_SECURITY_PROTOCOL_MAP");
    }
    for (name, (_, port)) in &advertised {
        let (_, bound_port) = bound.get(name).unwrap_or_else(|| panic!("advertised listener {name} is not in KAFKA_LISTENERS"));
        assert_eq!(port, bound_port, "listener {name} is advertised on port {port} but bound on {bound_port}");
    }
    let controller = var("KAFKA_CONTROLLER_LISTENER_NAMES");
    assert!(!advertised.contains_key(&controller), "the controller listener {controller} must not be advertised to clients");
    let (_, controller_port) = bound.get(&controller).unwrap_or_else(|| panic!("the controller listener {controller} is not in KAFKA_LISTENERS"));
    let voter = format!("{}@kafka:{controller_port}", var("KAFKA_NODE_ID"));
    assert_eq!(var("KAFKA_CONTROLLER_QUORUM_VOTERS"), voter, "the quorum voters do not name this node's controller listener");
    let inter = var("KAFKA_INTER_BROKER_LISTENER_NAME");
    assert!(advertised.contains_key(&inter), "the inter-broker listener {inter} is not advertised");
    let roles = var("KAFKA_PROCESS_ROLES");
    assert!(roles.contains("broker") && roles.contains("controller"), "KAFKA_PROCESS_ROLES is `{roles}`: one KRaft node must be broker and controller");
    // The image's start script stops in KRaft mode without a cluster id.
    assert!(!var("CLUSTER_ID").trim().is_empty(), "the kafka service's CLUSTER_ID is empty");

    // A listener advertised on localhost is for the host: its port must be published as itself.
    let ports = published(kafka);
    for (name, (host, port)) in &advertised {
        if host == "localhost" || host == "127.0.0.1" {
            assert_eq!(ports.get(port), Some(port), "listener {name} is advertised as {host}:{port}, but the kafka service does not publish {port}:{port}");
        }
    }

    // The schema registry reaches the broker on an advertised listener.
    let store = env_var(service(&compose, "schema-registry"), "schema-registry", "SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS");
    for s in store.split(',') {
        let (name, addr) = s.split_once("://").unwrap_or(("PLAINTEXT", s));
        assert_eq!(advertised.get(name), Some(&host_port(addr)), "the schema registry's broker `{s}` is not an advertised listener of kafka");
    }
}

#[test]
fn the_processor_starts_after_its_services_and_runs_a_bundled_topology() {
    let compose = compose();
    let processor = service(&compose, "hartonomous");
    let command = processor_command(&compose);
    assert!(command.iter().any(|a| a == "run"), "the processor's command {command:?} does not `run`");
    let topology = flag(&command, "--topology").expect("the processor's command names no --topology");
    assert!(repo().join(format!("topologies/{topology}.toml")).is_file(), "the processor runs `{topology}`, which has no topologies/{topology}.toml");
    hartonomous::topology::bundled(&topology).unwrap_or_else(|e| panic!("the processor runs `{topology}`, which is not a bundled topology: {e}"));

    let listen: SocketAddr = flag(&command, "--listen").expect("no --listen").parse().expect("--listen is not HOST:PORT");
    assert_eq!(published(processor).get(&listen.port()), Some(&listen.port()), "the processor's metrics port {} is not published", listen.port());

    for dep in ["kafka", "schema-registry", "clickhouse"] {
        let condition = processor.get("depends_on").and_then(|d| d.get(dep)).and_then(|d| d.get("condition")).map(scalar);
        assert_eq!(condition.as_deref(), Some("service_healthy"), "the processor must wait for `{dep}` to be healthy");
        assert!(service(&compose, dep).get("healthcheck").is_some(), "`{dep}` has no healthcheck, so `service_healthy` would never hold");
    }

    // The binary accepts the command line: with a profile that cannot be
    // read, it gets past the argument parser (exit 2 and a usage message on
    // an unknown flag) and fails on the profile (exit 1).
    let mut args = command.clone();
    let i = args.iter().position(|a| a == "--connectors").unwrap();
    args[i + 1] = "/nonexistent/hartonomous-compose-test.toml".into();
    let out = Command::new(env!("CARGO_BIN_EXE_hartonomous"))
        .args(&args)
        .env_remove("HARTONOMOUS_CONNECTORS")
        .env_remove("HARTONOMOUS_LISTEN")
        .output()
        .expect("run hartonomous");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the binary does not accept the processor's command {command:?}:\n{stderr}");
    assert!(stderr.contains("hartonomous-compose-test.toml: cannot read"), "unexpected failure for {args:?}:\n{stderr}");
}

#[test]
fn the_collector_receives_otlp_where_the_processor_sends_it() {
    let compose = compose();
    let collector = service(&compose, "otel-collector");
    let config_path = flag(&strings(collector.get("command")), "--config").expect("the collector's command names no --config");
    let config_file = mounted_file(collector, "otel-collector", &config_path);
    let config = yaml(&config_file);
    let protocols = &config["receivers"]["otlp"]["protocols"];
    for (protocol, port) in [("grpc", 4317), ("http", 4318)] {
        let endpoint = scalar(&protocols[protocol]["endpoint"]);
        assert_eq!(endpoint, format!("0.0.0.0:{port}"), "{}: OTLP/{protocol} must listen on 0.0.0.0:{port} (collectors default to localhost)", config_file.display());
    }
    let pipelines = config["service"]["pipelines"].as_mapping().expect("the collector config has no pipelines");
    for signal in ["traces", "metrics", "logs"] {
        let p = pipelines.get(signal).unwrap_or_else(|| panic!("{}: no {signal} pipeline", config_file.display()));
        assert!(strings(p.get("receivers")).contains(&"otlp".to_string()), "{}: the {signal} pipeline does not receive OTLP", config_file.display());
        assert!(strings(p.get("exporters")).contains(&"debug".to_string()), "{}: the {signal} pipeline does not export to debug", config_file.display());
    }
    let endpoint = env_var(service(&compose, "hartonomous"), "hartonomous", "OTEL_EXPORTER_OTLP_ENDPOINT");
    assert_eq!(host_port(&endpoint), ("otel-collector".to_string(), 4318), "OTEL_EXPORTER_OTLP_ENDPOINT `{endpoint}` is not the collector's OTLP/HTTP port");
}

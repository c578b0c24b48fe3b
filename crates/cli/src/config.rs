//! The settings of `edgebus serve` and where they come from.
//!
//! Each setting is taken from the first of these that sets it:
//!
//! 1. a command-line flag (`--data-dir`, …);
//! 2. an `EDGEBUS_*` environment variable (`EDGEBUS_DATA_DIR`, …);
//! 3. the TOML config file named by `--config` or `EDGEBUS_CONFIG`;
//! 4. the built-in default.
//!
//! Flags and variables are read by clap into one [`Settings`] layer (clap
//! already prefers a flag to its variable); the file is another layer
//! ([`load`]); [`Settings::or`] stacks them and [`Settings::resolve`] fills
//! in the defaults. A config file is strict: an unknown key, a value of the
//! wrong type or a value that does not parse is an error naming the file,
//! the key, and the line and column, so that a typo never silently falls
//! back to a default.
//!
//! Ingest quotas are one setting, a list: the first layer that gives any
//! quota (`--quota` flags, else `EDGEBUS_QUOTA`, else the file's `[[quota]]`
//! tables) gives them all; lists of different layers are not merged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgebus_gateway::GatewayConfig;
use edgebus_log::FsyncPolicy;
use edgebus_server::limits::NodeLimits;
use edgebus_server::node::{self, GatewayNodeConfig, NodeConfig};
use edgebus_server::quota::{QuotaSpec, Quotas};
use edgebus_store::StoreConfig;
use edgebus_types::SiteName;
use edgebus_types::limits::NODE_HTTP_IDLE_TIMEOUT_MS_MIN;
use serde::Deserialize;
use toml::Spanned;

/// A config file too large for a config file: most likely the wrong file.
const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// One layer of settings: each is `None` where this layer leaves it to the
/// next.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Directory of the log and the index.
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address.
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP listen address.
    pub http_listen: Option<SocketAddr>,
    /// When the log calls `fdatasync`.
    pub fsync: Option<FsyncPolicy>,
    /// Most connections each listener serves at once.
    pub max_connections: Option<usize>,
    /// Most subscriptions the node serves at once.
    pub max_subscriptions: Option<usize>,
    /// How long an HTTP connection may stay idle, in milliseconds.
    pub http_idle_timeout_ms: Option<u64>,
    /// Ingest quotas in declared order; a layer that gives any gives all.
    pub quotas: Option<Vec<QuotaSpec>>,
    /// This site's name (gateways name each other by it).
    pub site: Option<String>,
    /// Whether the node runs its site's gateway.
    pub gateway: Option<bool>,
    /// The gateway's WAN listen address.
    pub wan_listen: Option<SocketAddr>,
    /// The gateway's routes, policies and peers (config file only).
    pub gateway_file: Option<FileGateway>,
}

/// The `[gateway]` table of a config file; its presence turns the gateway on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGateway {
    /// WAN listen address.
    #[serde(default)]
    pub wan_listen: Option<String>,
    /// Sites accepted on inbound links (default: any other site).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Heartbeat and grant interval of links, in milliseconds (default 250).
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a link is judged dead, in milliseconds (default 5000).
    #[serde(default)]
    pub dead_after_ms: Option<u64>,
    /// This gateway's name, unique among the site's gateways (default `gw-SITE`).
    #[serde(default)]
    pub name: Option<String>,
    /// The lease: a standby gateway takes over after this much silence of the
    /// active one, in milliseconds (default 3000).
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// `[[gateway.routes]]`.
    #[serde(default)]
    pub routes: Vec<edgebus_gateway::def::RouteDef>,
    /// `[[gateway.policies]]`, in order.
    #[serde(default)]
    pub policies: Vec<edgebus_gateway::def::PolicyDef>,
}

impl Settings {
    /// This layer, with `lower` filling in what this one leaves unset.
    #[must_use]
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            data_dir: self.data_dir.or(lower.data_dir),
            grpc_listen: self.grpc_listen.or(lower.grpc_listen),
            http_listen: self.http_listen.or(lower.http_listen),
            fsync: self.fsync.or(lower.fsync),
            max_connections: self.max_connections.or(lower.max_connections),
            max_subscriptions: self.max_subscriptions.or(lower.max_subscriptions),
            http_idle_timeout_ms: self.http_idle_timeout_ms.or(lower.http_idle_timeout_ms),
            quotas: self.quotas.or(lower.quotas),
            site: self.site.or(lower.site),
            gateway: self.gateway.or(lower.gateway),
            wan_listen: self.wan_listen.or(lower.wan_listen),
            gateway_file: self.gateway_file.or(lower.gateway_file),
        }
    }

    /// The node's configuration: these settings, the defaults for the rest.
    pub fn resolve(self) -> anyhow::Result<NodeConfig> {
        let gateway = self.gateway_config()?;
        let default_limits = NodeLimits::default();
        let limits = NodeLimits {
            max_connections: self.max_connections.unwrap_or(default_limits.max_connections),
            max_subscriptions: self.max_subscriptions.unwrap_or(default_limits.max_subscriptions),
            http_idle_timeout: self
                .http_idle_timeout_ms
                .map_or(default_limits.http_idle_timeout, std::time::Duration::from_millis),
        };
        anyhow::ensure!(limits.max_connections >= 1, "max_connections must be at least 1");
        anyhow::ensure!(
            limits.http_idle_timeout.as_millis() >= u128::from(NODE_HTTP_IDLE_TIMEOUT_MS_MIN),
            "http_idle_timeout_ms must be at least {NODE_HTTP_IDLE_TIMEOUT_MS_MIN}"
        );
        let quotas = self.quotas.unwrap_or_default();
        // The node checks them again; checking here names the problem
        // before anything starts (too many, or one pattern twice).
        Quotas::new(quotas.clone(), std::time::Instant::now())?;
        let mut store = StoreConfig::default();
        if let Some(fsync) = self.fsync {
            store.log.fsync = fsync;
        }
        Ok(NodeConfig {
            gateway,
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from(node::DATA_DIR_DEFAULT)),
            grpc_listen: self.grpc_listen.unwrap_or_else(|| default_address(node::GRPC_LISTEN_DEFAULT)),
            http_listen: self.http_listen.unwrap_or_else(|| default_address(node::HTTP_LISTEN_DEFAULT)),
            store,
            limits,
            quotas,
        })
    }
}

impl Settings {
    /// The gateway, if `--gateway` or a `[gateway]` table asks for one (an
    /// `edgebus gateway` process always does).
    pub fn gateway_config(&self) -> anyhow::Result<Option<GatewayNodeConfig>> {
        let file = self.gateway_file.clone();
        if !self.gateway.unwrap_or(file.is_some()) {
            return Ok(None);
        }
        let file = file.unwrap_or_default();
        let site = self.site.as_deref().unwrap_or(SITE_DEFAULT);
        let site = SiteName::new(site).map_err(|e| anyhow::anyhow!("site: {e}"))?;
        let mut gateway = GatewayConfig::new(site.clone());
        for (i, def) in file.routes.iter().enumerate() {
            def.validate(&site).map_err(|e| anyhow::anyhow!("gateway.routes[{i}].{e}"))?;
        }
        for (i, def) in file.policies.iter().enumerate() {
            def.validate().map_err(|e| anyhow::anyhow!("gateway.policies[{i}].{e}"))?;
        }
        gateway.routes = file.routes;
        gateway.policies = file.policies;
        gateway.peers = file
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| SiteName::new(p).map_err(|e| anyhow::anyhow!("gateway.peers[{i}]: {e}")))
            .collect::<anyhow::Result<_>>()?;
        if let Some(ms) = file.heartbeat_ms {
            anyhow::ensure!(ms >= 10, "gateway.heartbeat_ms must be at least 10");
            gateway.heartbeat = std::time::Duration::from_millis(ms);
        }
        if let Some(ms) = file.dead_after_ms {
            anyhow::ensure!(
                u128::from(ms) > 2 * gateway.heartbeat.as_millis(),
                "gateway.dead_after_ms must be more than twice the heartbeat"
            );
            gateway.dead_after = std::time::Duration::from_millis(ms);
        }
        if let Some(name) = &file.name {
            edgebus_gateway::def::route_name("gateway.name", name).map_err(|e| anyhow::anyhow!("{e}"))?;
            gateway.name.clone_from(name);
        }
        if let Some(ms) = file.lease_ms {
            anyhow::ensure!(
                (edgebus_gateway::lease::LEASE_MS_MIN..=edgebus_gateway::lease::LEASE_MS_MAX).contains(&ms),
                "gateway.lease_ms {ms} is outside {}..={} (milliseconds)",
                edgebus_gateway::lease::LEASE_MS_MIN,
                edgebus_gateway::lease::LEASE_MS_MAX
            );
            gateway.lease_ms = ms;
        }
        let wan_listen = match (self.wan_listen, &file.wan_listen) {
            (Some(address), _) => address,
            (None, Some(text)) => text.parse().map_err(|_| {
                anyhow::anyhow!("gateway.wan_listen: {text:?} is not a socket address such as \"127.0.0.1:7292\"")
            })?,
            (None, None) => default_address(node::WAN_LISTEN_DEFAULT),
        };
        Ok(Some(GatewayNodeConfig { gateway, wan_listen }))
    }
}

/// The site name of a node started without `--site`.
pub const SITE_DEFAULT: &str = "local";

fn default_address(text: &str) -> SocketAddr {
    text.parse().expect("the default addresses parse")
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any config file should be.
    #[error("config file {} is {len_bytes} bytes, more than the maximum of {max_bytes}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the
    /// wrong type or that does not parse.
    #[error(
        "invalid config file {}, line {line}, column {column}: {}{message}",
        path.display(),
        key.as_deref().map(|key| format!("{key}: ")).unwrap_or_default()
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Line of the problem, from 1.
        line: usize,
        /// Column of the problem, from 1, in characters.
        column: usize,
        /// The key whose value is wrong, e.g. `grpc_listen` or
        /// `limits.max_connections`, when the problem is a value.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

/// The file as written; values that need parsing keep their position.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayer {
    data_dir: Option<PathBuf>,
    grpc_listen: Option<Spanned<String>>,
    http_listen: Option<Spanned<String>>,
    fsync: Option<Spanned<String>>,
    limits: Option<FileLimits>,
    quota: Option<Vec<FileQuota>>,
    site: Option<String>,
    gateway: Option<FileGateway>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_connections: Option<Spanned<usize>>,
    max_subscriptions: Option<usize>,
    http_idle_timeout_ms: Option<Spanned<u64>>,
}

/// One `[[quota]]` table: values are numbers or strings (`"1MiB"`), read
/// by the same code as the `--quota` flag's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuota {
    pattern: Spanned<String>,
    events_per_sec: Option<Spanned<toml::Value>>,
    bytes_per_sec: Option<Spanned<toml::Value>>,
    burst_events: Option<Spanned<toml::Value>>,
    burst_bytes: Option<Spanned<toml::Value>>,
}

/// Reads the config file at `path`.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let read = |source| ConfigError::Read { path: path.to_owned(), source };
    let len_bytes = std::fs::metadata(path).map_err(read)?.len();
    if len_bytes > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError::TooLarge { path: path.to_owned(), len_bytes, max_bytes: CONFIG_FILE_BYTES_MAX });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    parse(&text, path)
}

/// Parses `text`, the contents of the config file at `path` (which errors name).
pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    let invalid = |key: Option<&str>, offset: usize, message: String| {
        let (line, column) = line_and_column(text, offset);
        ConfigError::Invalid { path: path.to_owned(), line, column, key: key.map(str::to_owned), message }
    };
    let file: FileLayer = toml::from_str(text).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        invalid(key_of_value_at(text, offset).as_deref(), offset, error.message().trim().to_owned())
    })?;
    let bad_value = |key: &str, span: std::ops::Range<usize>, message: String| invalid(Some(key), span.start, message);
    let address = |key: &str, value: Option<Spanned<String>>| {
        value
            .map(|value| {
                value.get_ref().parse::<SocketAddr>().map_err(|_| {
                    let message = format!("{:?} is not a socket address such as \"127.0.0.1:7290\"", value.get_ref());
                    bad_value(key, value.span(), message)
                })
            })
            .transpose()
    };
    let grpc_listen = address("grpc_listen", file.grpc_listen)?;
    let http_listen = address("http_listen", file.http_listen)?;
    let fsync = file
        .fsync
        .map(|value| {
            value.get_ref().parse::<FsyncPolicy>().map_err(|message| bad_value("fsync", value.span(), message))
        })
        .transpose()?;
    let limits = file.limits.unwrap_or_default();
    let max_connections = limits
        .max_connections
        .map(|value| match *value.get_ref() {
            0 => Err(bad_value("limits.max_connections", value.span(), "must be at least 1".to_owned())),
            max => Ok(max),
        })
        .transpose()?;
    let http_idle_timeout_ms = limits
        .http_idle_timeout_ms
        .map(|value| match *value.get_ref() {
            ms if ms < NODE_HTTP_IDLE_TIMEOUT_MS_MIN => Err(bad_value(
                "limits.http_idle_timeout_ms",
                value.span(),
                format!("must be at least {NODE_HTTP_IDLE_TIMEOUT_MS_MIN}"),
            )),
            ms => Ok(ms),
        })
        .transpose()?;
    let quotas = file
        .quota
        .map(|quotas| {
            quotas
                .into_iter()
                .enumerate()
                .map(|(index, quota)| {
                    file_quota(index, quota).map_err(|(key, span, message)| bad_value(&key, span, message))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(Settings {
        data_dir: file.data_dir,
        grpc_listen,
        http_listen,
        fsync,
        max_connections,
        max_subscriptions: limits.max_subscriptions,
        http_idle_timeout_ms,
        quotas,
        site: file.site,
        gateway: None,
        wan_listen: None,
        gateway_file: file.gateway,
    })
}

/// The quota of the `[[quota]]` table at `index`, or the key (as
/// `quota[2].events_per_sec`), the span and the problem of a bad value.
fn file_quota(index: usize, quota: FileQuota) -> Result<QuotaSpec, (String, std::ops::Range<usize>, String)> {
    let key = |name: &str| format!("quota[{index}].{name}");
    let pattern_span = quota.pattern.span();
    let mut spec =
        QuotaSpec::new(quota.pattern.get_ref()).map_err(|e| (key(e.key), pattern_span.clone(), e.message))?;
    let values = [
        ("events_per_sec", quota.events_per_sec),
        ("bytes_per_sec", quota.bytes_per_sec),
        ("burst_events", quota.burst_events),
        ("burst_bytes", quota.burst_bytes),
    ];
    for (name, value) in values {
        let Some(value) = value else { continue };
        let text = match value.get_ref() {
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::String(text) => text.clone(),
            other => {
                let message = format!("expected a number or a string such as \"1MiB\", got {}", other.type_str());
                return Err((key(name), value.span(), message));
            }
        };
        spec.set(name, &text).map_err(|e| (key(e.key), value.span(), e.message))?;
    }
    // A problem of the whole table is reported at its pattern.
    spec.check().map_err(|e| (key(e.key), pattern_span, e.message))?;
    Ok(spec)
}

/// The dotted key whose value starts at byte `offset` of `text`, such as
/// `limits.max_connections`; `None` if `offset` is not in a `key = value`
/// line's value. Good enough for error messages about this file's flat
/// layout (top-level keys and one level of tables).
fn key_of_value_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |newline| offset + newline);
    let (key, _) = text[line_start..line_end].split_once('=')?;
    if line_start + key.len() >= offset {
        return None;
    }
    let key = key.trim();
    let before = &text[..line_start];
    let table = before.lines().rev().find_map(|line| {
        let line = line.trim();
        // An array of tables, `[[quota]]`, is named with its index: `quota[2]`.
        if let Some(name) = line.strip_prefix("[[").and_then(|rest| rest.split("]]").next()) {
            let name = name.trim();
            let index = before
                .lines()
                .filter(|line| {
                    line.trim().strip_prefix("[[").and_then(|r| r.split("]]").next()).map(str::trim) == Some(name)
                })
                .count()
                - 1;
            return Some(format!("{name}[{index}]"));
        }
        line.strip_prefix('[').and_then(|rest| rest.split(']').next()).map(|name| name.trim().to_owned())
    });
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn file(text: &str) -> Result<Settings, ConfigError> {
        parse(text, Path::new("/etc/edgebus.toml"))
    }

    fn error(text: &str) -> String {
        file(text).expect_err("the file is refused").to_string()
    }

    #[test]
    fn a_gateway_table_turns_the_gateway_on_with_its_routes_and_policies() {
        let settings = file(
            r#"
            site = "eu"
            [gateway]
            wan_listen = "127.0.0.1:0"
            peers = ["us"]
            [[gateway.routes]]
            remote_site = "us"
            addresses = ["127.0.0.1:7392"]
            lanes = [{ name = "critical", reserved_permille = 250 }, { name = "bulk" }]
            [[gateway.policies]]
            pattern = "telemetry.>"
            action = "sample 1/10"
            lane = "bulk"
            "#,
        )
        .expect("a valid file");
        let config = settings.resolve().expect("valid settings");
        let gateway = config.gateway.expect("the gateway is on");
        assert_eq!(gateway.gateway.site.as_str(), "eu");
        assert_eq!(gateway.gateway.routes.len(), 1);
        assert_eq!(gateway.gateway.policies[0].action, "sample 1/10");
        assert_eq!(gateway.wan_listen, "127.0.0.1:0".parse().unwrap());
        // Without the table or --gateway there is none.
        assert!(file("site = \"eu\"").unwrap().resolve().unwrap().gateway.is_none());
    }

    #[test]
    fn bad_gateway_settings_name_the_field() {
        let e = error("[gateway]\n[[gateway.routes]]\nremote_site = \"us\"\naddress = [\"h:1\"]\n");
        assert!(e.contains("line 4") && e.contains("address"), "{e}");
        let resolve = |text: &str| file(text).unwrap().resolve().unwrap_err().to_string();
        let e = resolve("site = \"eu\"\n[gateway]\n[[gateway.routes]]\nremote_site = \"eu\"\naddresses = [\"h:1\"]\n");
        assert!(e.contains("gateway.routes[0].remote_site") && e.contains("is this site"), "{e}");
        let e = resolve("[gateway]\n[[gateway.policies]]\npattern = \"a.>\"\naction = \"sample 10\"\n");
        assert!(e.contains("gateway.policies[0].action") && e.contains("1/N"), "{e}");
        let e = resolve("site = \"EU\"\n[gateway]\n");
        assert!(e.contains("site") && e.contains("'E'"), "{e}");
        let e = resolve("[gateway]\npeers = [\"a b\"]\n");
        assert!(e.contains("gateway.peers[0]"), "{e}");
    }

    #[test]
    fn every_key_is_read() {
        let settings = file(
            r#"
            data_dir = "/var/lib/edgebus"
            grpc_listen = "0.0.0.0:7290"
            http_listen = "[::1]:8080"
            fsync = "interval(5ms)"

            [limits]
            max_connections = 16
            max_subscriptions = 0
            http_idle_timeout_ms = 1500

            [[quota]]
            pattern = "telemetry.>"
            events_per_sec = 1000
            bytes_per_sec = "1MiB"

            [[quota]]
            pattern = "alerts.*"
            events_per_sec = 0.5
            burst_events = 3
            bytes_per_sec = 4096
            burst_bytes = "8KiB"
            "#,
        )
        .expect("a valid file");
        assert_eq!(
            settings,
            Settings {
                data_dir: Some(PathBuf::from("/var/lib/edgebus")),
                grpc_listen: Some("0.0.0.0:7290".parse().unwrap()),
                http_listen: Some("[::1]:8080".parse().unwrap()),
                fsync: Some(FsyncPolicy::Interval(Duration::from_millis(5))),
                max_connections: Some(16),
                max_subscriptions: Some(0),
                http_idle_timeout_ms: Some(1500),
                quotas: Some(vec![
                    QuotaSpec::parse_flag("telemetry.>,events_per_sec=1000,bytes_per_sec=1048576").unwrap(),
                    QuotaSpec::parse_flag(
                        "alerts.*,events_per_sec=0.5,burst_events=3,bytes_per_sec=4096,burst_bytes=8192"
                    )
                    .unwrap(),
                ]),
                ..Settings::default()
            }
        );
        assert_eq!(file("").expect("an empty file is valid"), Settings::default());
    }

    #[test]
    fn nothing_set_resolves_to_the_defaults() {
        let config = Settings::default().resolve().expect("defaults are valid");
        assert_eq!(config.data_dir, PathBuf::from("edgebus-data"));
        assert_eq!(config.grpc_listen.to_string(), "127.0.0.1:7290");
        assert_eq!(config.http_listen.to_string(), "127.0.0.1:7291");
        assert_eq!(config.store.log.fsync, FsyncPolicy::Always);
        assert_eq!(
            config.limits,
            NodeLimits { max_connections: 1024, max_subscriptions: 10_000, http_idle_timeout: Duration::from_secs(30) }
        );
        assert!(config.quotas.is_empty());
    }

    #[test]
    fn a_higher_layer_wins_key_by_key() {
        let flags = Settings { data_dir: Some("flag".into()), ..Settings::default() };
        let env = Settings { data_dir: Some("env".into()), max_connections: Some(7), ..Settings::default() };
        let file = Settings {
            data_dir: Some("file".into()),
            max_connections: Some(9),
            fsync: Some(FsyncPolicy::Never),
            ..Settings::default()
        };
        let config = flags.or(env).or(file).resolve().expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("flag"));
        assert_eq!(config.limits.max_connections, 7);
        assert_eq!(config.store.log.fsync, FsyncPolicy::Never);
        assert_eq!(config.limits.max_subscriptions, 10_000);
        let zero = Settings { max_connections: Some(0), ..Settings::default() }.resolve().unwrap_err();
        assert_eq!(zero.to_string(), "max_connections must be at least 1");
    }

    #[test]
    fn the_first_layer_with_quotas_gives_them_all() {
        let quota = |text: &str| QuotaSpec::parse_flag(text).unwrap();
        let flags = Settings { quotas: Some(vec![quota("a.>,events_per_sec=5")]), ..Settings::default() };
        let file = Settings {
            quotas: Some(vec![quota("b.>,events_per_sec=1"), quota("c.>,events_per_sec=1")]),
            http_idle_timeout_ms: Some(100),
            ..Settings::default()
        };
        let config = flags.or(file.clone()).resolve().expect("valid");
        assert_eq!(config.quotas, vec![quota("a.>,events_per_sec=5")]);
        assert_eq!(config.limits.http_idle_timeout, Duration::from_millis(100));
        let config = Settings::default().or(file).resolve().expect("valid");
        assert_eq!(config.quotas.len(), 2);
        let twice = Settings {
            quotas: Some(vec![quota("a.>,events_per_sec=5"), quota("a.>,bytes_per_sec=5")]),
            ..Settings::default()
        };
        assert_eq!(
            twice.resolve().unwrap_err().to_string(),
            "quota[1].pattern: a.> is already the pattern of quota[0]"
        );
        let short = Settings { http_idle_timeout_ms: Some(5), ..Settings::default() }.resolve().unwrap_err();
        assert_eq!(short.to_string(), "http_idle_timeout_ms must be at least 10");
    }

    #[test]
    fn a_bad_quota_names_its_entry_key_and_line() {
        let quotas = |body: &str| format!("[[quota]]\npattern = \"ok.>\"\nevents_per_sec = 1\n\n[[quota]]\n{body}\n");
        assert_eq!(
            error(&quotas("pattern = \"t.>\"\nevents_per_sec = 0")),
            "invalid config file /etc/edgebus.toml, line 7, column 18: quota[1].events_per_sec: must be > 0, got \"0\""
        );
        let message = error(&quotas("pattern = \"t.>\"\nevents_per_sec = -3"));
        assert!(message.ends_with("line 7, column 18: quota[1].events_per_sec: must be > 0, got \"-3\""), "{message}");
        let message = error(&quotas("pattern = \"t.>.x\"\nevents_per_sec = 1"));
        assert!(message.contains("line 6, column 11: quota[1].pattern: "), "{message}");
        let message = error(&quotas("pattern = \"t.>\"\nbytes_per_sec = \"1 parsec\""));
        assert!(message.contains("line 7, column 17: quota[1].bytes_per_sec: unknown unit \"parsec\""), "{message}");
        let message = error(&quotas("pattern = \"t.>\"\nevents_per_sec = 5\nburst_events = 0"));
        assert!(
            message.ends_with("line 8, column 16: quota[1].burst_events: must be at least 1 event, got 0"),
            "{message}"
        );
        let message = error(&quotas("pattern = \"t.>\"\nevents_per_sec = 5\nburst_events = 0.5"));
        assert!(message.contains("quota[1].burst_events: \"0.5\" is not a whole number"), "{message}");
        let message = error(&quotas("pattern = \"t.>\""));
        assert!(
            message.ends_with(
                "line 6, column 11: quota[1].quota: sets no rate: give events_per_sec, bytes_per_sec or both"
            ),
            "{message}"
        );
        let message = error(&quotas("pattern = \"t.>\"\nevents_per_sec = [1]"));
        assert!(message.contains("quota[1].events_per_sec: expected a number or a string"), "{message}");
        let message = error(&quotas("pattern = \"t.>\"\nevents_per_second = 1"));
        assert!(message.contains("line 7, column 1: unknown field `events_per_second`"), "{message}");
        let message = error(&quotas("events_per_sec = 1"));
        assert!(message.contains("missing field `pattern`"), "{message}");
        let message = error(&quotas("pattern = 5\nevents_per_sec = 1"));
        assert!(message.contains("line 6, column 11: quota[1].pattern: invalid type: integer"), "{message}");
        let message = error("[limits]\nhttp_idle_timeout_ms = 3");
        assert!(message.ends_with("line 2, column 24: limits.http_idle_timeout_ms: must be at least 10"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_named_with_the_file_and_line() {
        assert_eq!(
            error("data_dir = \"d\"\ngrpc_lisen = \"127.0.0.1:1\"\n"),
            "invalid config file /etc/edgebus.toml, line 2, column 1: unknown field `grpc_lisen`, expected one of \
             `data_dir`, `grpc_listen`, `http_listen`, `fsync`, `limits`, `quota`, `site`, `gateway`"
        );
        let message = error("[limits]\nmax_conections = 3\n");
        assert!(message.contains("line 2, column 1: unknown field `max_conections`"), "{message}");
        let message = error("[limit]\nmax_connections = 3\n");
        assert!(message.contains("line 1, column 2: unknown field `limit`"), "{message}");
    }

    #[test]
    fn a_syntax_error_names_the_file_line_and_column() {
        let message = error("data_dir = \"d\"\nfsync = always\n");
        assert!(message.starts_with("invalid config file /etc/edgebus.toml, line 2, column 9: "), "{message}");
        let message = error("data_dir = \"d\"\n[limits\n");
        assert!(message.starts_with("invalid config file /etc/edgebus.toml, line 2, column "), "{message}");
    }

    #[test]
    fn a_bad_value_names_the_key_and_where_it_is() {
        assert_eq!(
            error("\n  grpc_listen = \"nope\""),
            "invalid config file /etc/edgebus.toml, line 2, column 17: grpc_listen: \"nope\" is not a socket \
             address such as \"127.0.0.1:7290\""
        );
        let message = error("http_listen = \"localhost\"");
        assert!(message.contains("column 15: http_listen: \"localhost\""), "{message}");
        let message = error("fsync = \"sometimes\"");
        assert!(message.contains("line 1, column 9: fsync: unknown fsync policy"), "{message}");
        let message = error("[limits]\nmax_connections = 0");
        assert!(message.ends_with("line 2, column 19: limits.max_connections: must be at least 1"), "{message}");
        // Values of the wrong type.
        assert_eq!(
            error("data_dir = \"d\"\n[limits]\nmax_connections = \"many\""),
            "invalid config file /etc/edgebus.toml, line 3, column 19: limits.max_connections: invalid type: \
             string \"many\", expected usize"
        );
        let message = error("[limits]\nmax_subscriptions = -1");
        assert!(message.contains("line 2, column 21: limits.max_subscriptions: "), "{message}");
        let message = error("grpc_listen = 7290");
        assert!(message.contains("line 1, column 15: grpc_listen: invalid type: integer"), "{message}");
        let message = error("data_dir = [1]");
        assert!(message.contains("data_dir: invalid type"), "{message}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let message = load(Path::new("/nonexistent/edgebus.toml")).unwrap_err().to_string();
        assert_eq!(message, "cannot read config file /nonexistent/edgebus.toml");
    }

    #[test]
    fn the_key_of_a_value_is_found_by_its_offset() {
        let text = "a = 1\n[limits]\n  b = \"x\"\n";
        assert_eq!(key_of_value_at(text, 4).as_deref(), Some("a"));
        assert_eq!(key_of_value_at(text, 0), None, "on the key itself");
        assert_eq!(key_of_value_at(text, 21).as_deref(), Some("limits.b"));
        assert_eq!(key_of_value_at(text, 7), None, "a table header");
        assert_eq!(key_of_value_at(text, 1000), None);
    }

    #[test]
    fn the_readme_example_is_a_valid_config_file() {
        let readme = include_str!("../../../README.md");
        let (_, rest) = readme.split_once("```toml\n").expect("the README has a TOML example");
        let (example, _) = rest.split_once("```").expect("the example ends");
        let settings = file(example).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.data_dir, Some(PathBuf::from("/var/lib/edgebus")));
        assert_eq!(settings.max_connections, Some(1024));
        assert_eq!(settings.max_subscriptions, Some(10_000));
        assert_eq!(settings.fsync, Some(FsyncPolicy::Always));
        assert_eq!(settings.http_idle_timeout_ms, Some(30_000));
        let quotas = settings.quotas.expect("the example has quotas");
        assert_eq!(quotas[0].to_string(), "telemetry.>,events_per_sec=1000,bytes_per_sec=1048576");
        let gateway = settings.gateway_file.clone().expect("the example has a gateway");
        assert_eq!((gateway.routes.len(), gateway.policies.len()), (1, 1));
        Settings { quotas: Some(quotas), ..settings }.resolve().expect("the example resolves");
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_and_column("abc", 0), (1, 1));
        assert_eq!(line_and_column("a\nbc", 3), (2, 2));
        assert_eq!(line_and_column("é = 1\nx", 7), (2, 1));
        assert_eq!(line_and_column("é = 1", 5), (1, 5));
    }
}

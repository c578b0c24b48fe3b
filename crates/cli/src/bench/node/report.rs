//! The figures of `edgebus bench node`: the rows, the ratios of our
//! figures to each peer's in the same cell, the targets, and the printed
//! report (the `--json` object is [`Report`] itself).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::super::histogram::Histogram;
use super::super::machine::{Filesystem, Machine};
use super::PAYLOAD_BYTES;
use super::drive::Measured;

/// Where the targets are checked.
pub const TARGET_CLIENTS: usize = 256;
pub const TARGET_NATS_THROUGHPUT_RATIO_MIN: f64 = 2.0;
pub const TARGET_NATS_P99_RATIO_MAX: f64 = 1.0;
pub const TARGET_POSTGRES_THROUGHPUT_RATIO_MIN: f64 = 5.0;

/// A system measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// Our node, `fsync=always`.
    Edgebus,
    /// Our node, fsync every [`RELAXED_FSYNC_INTERVAL`] (NATS's durability).
    EdgebusRelaxed,
    /// NATS JetStream, file storage, its default sync interval.
    Nats,
    /// NATS JetStream, file storage, `sync_interval: always`.
    NatsSync,
    /// PostgreSQL, `fsync=on`, `synchronous_commit=on`.
    Postgres,
}

impl System {
    pub const ALL: [Self; 5] = [Self::Edgebus, Self::EdgebusRelaxed, Self::Nats, Self::NatsSync, Self::Postgres];

    pub fn name(self) -> &'static str {
        match self {
            Self::Edgebus => "edgebus",
            Self::EdgebusRelaxed => "edgebus-relaxed",
            Self::Nats => "nats",
            Self::NatsSync => "nats-sync",
            Self::Postgres => "postgres",
        }
    }

    /// The name in a ratio: `2.31× nats`.
    pub fn short(self) -> &'static str {
        match self {
            Self::Postgres => "pg",
            other => other.name(),
        }
    }

    pub fn is_ours(self) -> bool {
        matches!(self, Self::Edgebus | Self::EdgebusRelaxed)
    }

    /// Whether an acknowledgement means the event was fsynced.
    pub fn fsync_per_ack(self) -> bool {
        matches!(self, Self::Edgebus | Self::NatsSync | Self::Postgres)
    }
}

/// One ratio of ours to a peer's, same cell.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratio {
    /// Our events/s over the peer's.
    pub events_per_s: f64,
    /// Our p50 and p99 ack latency over the peer's (below 1: ours is lower).
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Whether both acknowledge at the same durability.
    pub equal_durability: bool,
}

/// One publish-with-ack cell of one system.
#[derive(Debug, Clone, Serialize)]
pub struct PublishRow {
    pub system: System,
    pub clients: usize,
    pub payload_bytes: usize,
    pub connections: usize,
    pub events: u64,
    pub window_s: f64,
    pub events_per_s: f64,
    pub mb_per_s: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// CPU time per acknowledged event in the window, µs: the server's
    /// process (none for PostgreSQL's process per connection) and the
    /// benchmark's own, which runs the clients.
    pub server_cpu_us_per_event: Option<f64>,
    pub client_cpu_us_per_event: Option<f64>,
    /// For our systems: ratios to each peer measured in the same cell, by peer name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ratios: BTreeMap<&'static str, Ratio>,
}

pub fn quantile_us(latency: &Histogram, quantile: f64) -> Option<f64> {
    latency.quantile(quantile).map(|d| d.as_secs_f64() * 1e6)
}

impl PublishRow {
    pub fn new(system: System, clients: usize, payload_bytes: usize, measured: &Measured) -> Self {
        let events_per_s = measured.events as f64 / measured.window.as_secs_f64();
        Self {
            system,
            clients,
            payload_bytes,
            connections: measured.connections,
            events: measured.events,
            window_s: measured.window.as_secs_f64(),
            events_per_s,
            mb_per_s: events_per_s * payload_bytes as f64 / 1e6,
            p50_us: quantile_us(&measured.latency, 0.5),
            p99_us: quantile_us(&measured.latency, 0.99),
            server_cpu_us_per_event: per_event(measured.server_cpu, measured.events),
            client_cpu_us_per_event: per_event(measured.client_cpu, measured.events),
            ratios: BTreeMap::new(),
        }
    }
}

/// `cpu` per event, µs.
fn per_event(cpu: Option<Duration>, events: u64) -> Option<f64> {
    cpu.filter(|_| events > 0).map(|cpu| cpu.as_secs_f64() * 1e6 / events as f64)
}

/// Fills in the ratios of each of our rows to each peer row of the same cell.
pub fn add_ratios(rows: &mut [PublishRow]) {
    let peers: Vec<PublishRow> = rows.iter().filter(|r| !r.system.is_ours()).cloned().collect();
    for row in rows.iter_mut().filter(|r| r.system.is_ours()) {
        for peer in peers.iter().filter(|p| p.clients == row.clients && p.payload_bytes == row.payload_bytes) {
            let over = |ours: Option<f64>, theirs: Option<f64>| Some(ours? / theirs.filter(|t| *t > 0.0)?);
            let ratio = Ratio {
                events_per_s: row.events_per_s / peer.events_per_s.max(f64::MIN_POSITIVE),
                p50: over(row.p50_us, peer.p50_us),
                p99: over(row.p99_us, peer.p99_us),
                equal_durability: row.system.fsync_per_ack() == peer.system.fsync_per_ack(),
            };
            row.ratios.insert(peer.system.short(), ratio);
        }
    }
}

/// `2.31×`: three significant digits, at most two decimals.
pub fn format_ratio(ratio: f64) -> String {
    let digits = if ratio >= 100.0 {
        0
    } else if ratio >= 10.0 {
        1
    } else {
        2
    };
    format!("{ratio:.digits$}×")
}

/// `2.31× nats, 7.90× pg*` (`*`: equal durability) from ratios picked by `pick`.
pub fn format_ratios(ratios: &BTreeMap<&'static str, Ratio>, pick: impl Fn(&Ratio) -> Option<f64>) -> String {
    let parts: Vec<String> = System::ALL
        .iter()
        .filter_map(|peer| {
            let ratio = ratios.get(peer.short())?;
            let value = pick(ratio)?;
            Some(format!("{} {}{}", format_ratio(value), peer.short(), if ratio.equal_durability { "*" } else { "" }))
        })
        .collect();
    if parts.is_empty() { "-".to_owned() } else { parts.join(", ") }
}

/// Whether a target was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
    /// A comparison printed for information, not a target (unequal durability).
    Info,
    /// A peer needed for the target did not run.
    Skip,
}

/// One target and how this run did.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub verdict: Verdict,
    pub target: String,
    pub measured: Option<f64>,
    pub required: Option<f64>,
    pub detail: String,
}

/// The pair of systems the NATS targets compare: equal durability, with
/// fsync per ack if the NATS server can do it.
pub fn nats_pair(present: &[System]) -> Option<(System, System, &'static str)> {
    if present.contains(&System::Edgebus) && present.contains(&System::NatsSync) {
        Some((System::Edgebus, System::NatsSync, "equal durability: both fsync before each ack"))
    } else if present.contains(&System::EdgebusRelaxed) && present.contains(&System::Nats) {
        Some((
            System::EdgebusRelaxed,
            System::Nats,
            "equal durability: both ack before fsync, fsync every 2 min; this nats-server cannot fsync per write",
        ))
    } else {
        None
    }
}

/// Checks the targets at [`TARGET_CLIENTS`] clients for each payload size.
pub fn check_targets(rows: &[PublishRow]) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut present: Vec<System> = rows.iter().map(|r| r.system).collect();
    present.sort();
    present.dedup();
    for payload_bytes in PAYLOAD_BYTES {
        let cell = format!("{TARGET_CLIENTS} clients, {}", payload_label(payload_bytes));
        let row = |system| {
            rows.iter().find(|r| r.system == system && r.clients == TARGET_CLIENTS && r.payload_bytes == payload_bytes)
        };
        let ratio = |ours: System, peer: System| row(ours).and_then(|r| r.ratios.get(peer.short()).copied());
        match nats_pair(&present) {
            Some((ours, peer, why)) => {
                let ratio = ratio(ours, peer);
                let throughput = ratio.map(|r| r.events_per_s);
                checks.push(Check {
                    verdict: verdict(throughput.map(|t| t >= TARGET_NATS_THROUGHPUT_RATIO_MIN)),
                    target: format!(
                        "publish-with-ack events/s, {cell}: {} >= {TARGET_NATS_THROUGHPUT_RATIO_MIN}x {}",
                        ours.name(),
                        peer.name()
                    ),
                    measured: throughput,
                    required: Some(TARGET_NATS_THROUGHPUT_RATIO_MIN),
                    detail: why.to_owned(),
                });
                let p99 = ratio.and_then(|r| r.p99);
                checks.push(Check {
                    verdict: verdict(p99.map(|p| p <= TARGET_NATS_P99_RATIO_MAX)),
                    target: format!("p99 ack latency, {cell}: {} <= {}", ours.name(), peer.name()),
                    measured: p99,
                    required: Some(TARGET_NATS_P99_RATIO_MAX),
                    detail: why.to_owned(),
                });
            }
            None => checks.push(Check {
                verdict: Verdict::Skip,
                target: format!("publish-with-ack events/s and p99, {cell}: edgebus vs nats at equal durability"),
                measured: None,
                required: None,
                detail: "nats did not run".to_owned(),
            }),
        }
        if nats_pair(&present).is_some_and(|(ours, _, _)| ours != System::Edgebus)
            && let Some(r) = ratio(System::Edgebus, System::Nats)
        {
            checks.push(Check {
                verdict: Verdict::Info,
                target: format!("{cell}: edgebus (fsync per ack) vs nats (no fsync per ack)"),
                measured: Some(r.events_per_s),
                required: None,
                detail: format!(
                    "not equal durability: events/s {}, p99 {}",
                    format_ratio(r.events_per_s),
                    r.p99.map_or_else(|| "-".to_owned(), format_ratio)
                ),
            });
        }
        let throughput = ratio(System::Edgebus, System::Postgres).map(|r| r.events_per_s);
        checks.push(Check {
            verdict: if present.contains(&System::Postgres) {
                verdict(throughput.map(|t| t >= TARGET_POSTGRES_THROUGHPUT_RATIO_MIN))
            } else {
                Verdict::Skip
            },
            target: format!(
                "publish-with-ack events/s, {cell}: edgebus >= {TARGET_POSTGRES_THROUGHPUT_RATIO_MIN}x postgres"
            ),
            measured: throughput,
            required: Some(TARGET_POSTGRES_THROUGHPUT_RATIO_MIN),
            detail: if present.contains(&System::Postgres) {
                "equal durability: both fsync before each ack".to_owned()
            } else {
                "postgres did not run".to_owned()
            },
        });
    }
    checks
}

pub fn verdict(met: Option<bool>) -> Verdict {
    match met {
        Some(true) => Verdict::Pass,
        Some(false) => Verdict::Fail,
        None => Verdict::Skip,
    }
}

pub fn payload_label(bytes: usize) -> String {
    if bytes.is_multiple_of(1024) { format!("{} KiB", bytes / 1024) } else { format!("{bytes} B") }
}

/// Whether a peer ran, and what it is.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub system: System,
    pub ran: bool,
    /// Why it did not run (or stopped running).
    pub reason: Option<String>,
    pub version: Option<String>,
}

impl PeerStatus {
    pub fn ran(system: System, version: &str) -> Self {
        Self { system, ran: true, reason: None, version: Some(version.to_owned()) }
    }

    pub fn not_run(system: System, reason: String, version: Option<&str>) -> Self {
        Self { system, ran: false, reason: Some(reason), version: version.map(str::to_owned) }
    }
}

/// One end-to-end row.
#[derive(Debug, Clone, Serialize)]
pub struct EndToEndRow {
    pub system: System,
    pub clients: usize,
    pub payload_bytes: usize,
    pub events: u64,
    pub window_s: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// The fan-out figures.
#[derive(Debug, Clone, Serialize)]
pub struct FanOutRow {
    pub system: System,
    pub subscribers: usize,
    pub publishers: usize,
    pub events: u64,
    pub payload_bytes: usize,
    pub publish_s: f64,
    pub last_delivery_s: f64,
    pub deliveries_per_s: f64,
    pub delivery_p50_us: Option<f64>,
    pub delivery_p99_us: Option<f64>,
}

/// What settling the machine before each cell cost (`machine::settle`).
#[derive(Debug, Default, Serialize)]
pub struct SettleTally {
    /// The longest wait for quiet cores before one cell.
    pub max_wait_s: f64,
    pub cells: usize,
    /// Cells that started with the cores still busy: the wait ran out.
    pub cells_busy: usize,
    /// Syncs and waits, in all.
    pub waited_s: f64,
}

/// Everything one run measured; `--json` prints it as one object.
#[derive(Debug, Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub date: String,
    pub quick: bool,
    pub machine: Machine,
    pub filesystem: Filesystem,
    pub load_average_start: Option<[f64; 3]>,
    pub load_average_end: Option<[f64; 3]>,
    pub warmup_s: f64,
    pub window_s: f64,
    pub clients_per_connection: usize,
    pub settle: SettleTally,
    /// What an acknowledgement means for each system that ran.
    pub durability: BTreeMap<System, String>,
    pub peers: Vec<PeerStatus>,
    pub publish: Vec<PublishRow>,
    pub end_to_end: Vec<EndToEndRow>,
    pub fan_out: Option<FanOutRow>,
    pub groups: Vec<super::groups::GroupRow>,
    pub checks: Vec<Check>,
}

pub fn print_report(report: &Report) {
    println!("edgebus bench node — {}", report.date);
    println!("machine:    {}", report.machine.describe());
    println!("filesystem: {}", report.filesystem.describe());
    if let (Some(start), Some(end)) = (report.load_average_start, report.load_average_end) {
        println!("load:       {:.2} at start, {:.2} at end (1-minute average)", start[0], end[0]);
    }
    println!(
        "workload:   each client publishes one event and waits for its ack; {:.0} s measured after {:.2} s of \
         warm-up per cell; edgebus and nats: one connection per {} clients, postgres: one per client (one INSERT \
         per transaction, each client on its own stream); clients and servers share the machine's cores",
        report.window_s, report.warmup_s, report.clients_per_connection
    );
    let settle = &report.settle;
    println!(
        "settling:   before each cell, the scratch filesystem is synced (no system flushes another's writes) and \
         the cores are given up to {:.0} s to fall quiet; {} of {} cells started busier, {:.1} s spent settling",
        settle.max_wait_s, settle.cells_busy, settle.cells, settle.waited_s
    );
    println!("durability:");
    for (system, text) in &report.durability {
        println!("  {:<16} {text}", system.name());
    }
    for peer in &report.peers {
        match (&peer.reason, peer.ran) {
            (None, _) => println!("peer {}: ran", peer.system.name()),
            (Some(reason), true) => println!("peer {}: stopped ({reason})", peer.system.name()),
            (Some(reason), false) => println!("peer {}: not run ({reason})", peer.system.name()),
        }
    }
    println!();
    println!(
        "publish with ack (ratios: ours over the peer's; * = equal durability; CPU: µs of CPU time per event, \
         of the server's process and of the clients')"
    );
    println!(
        "{:>7} {:>7}  {:<16} {:>7} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7}  {:<42} p99 vs peers",
        "clients",
        "payload",
        "system",
        "fsync",
        "events/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "CPU srv",
        "CPU cli",
        "events/s vs peers",
    );
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    let cpu = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    for r in &report.publish {
        let ours = r.system.is_ours();
        let line = format!(
            "{:>7} {:>7}  {:<16} {:>7} {:>10.0} {:>8.2} {:>8} {:>8} {:>7} {:>7}  {:<42} {}",
            r.clients,
            payload_label(r.payload_bytes),
            r.system.name(),
            if r.system.fsync_per_ack() { "per ack" } else { "2 min" },
            r.events_per_s,
            r.mb_per_s,
            us(r.p50_us),
            us(r.p99_us),
            cpu(r.server_cpu_us_per_event),
            cpu(r.client_cpu_us_per_event),
            if ours { format_ratios(&r.ratios, |x| Some(x.events_per_s)) } else { String::new() },
            if ours { format_ratios(&r.ratios, |x| x.p99) } else { String::new() },
        );
        println!("{}", line.trim_end());
    }
    println!();
    println!(
        "end-to-end latency, publish -> subscriber (edgebus, fsync=always; one subscriber on a pattern over the publishers' streams)"
    );
    println!("{:>7} {:>7} {:>10} {:>8} {:>8}", "clients", "payload", "events", "p50 µs", "p99 µs");
    for r in &report.end_to_end {
        println!(
            "{:>7} {:>7} {:>10} {:>8} {:>8}",
            r.clients,
            payload_label(r.payload_bytes),
            r.events,
            us(r.p50_us),
            us(r.p99_us)
        );
    }
    if let Some(f) = &report.fan_out {
        println!();
        println!(
            "fan-out (edgebus, fsync=always): {} subscribers on one stream, {} events of {} from {} clients",
            f.subscribers,
            f.events,
            payload_label(f.payload_bytes),
            f.publishers
        );
        println!(
            "  all acked after {:.2} s ({:.0} events/s); the last subscriber had the last event after {:.2} s",
            f.publish_s,
            f.events as f64 / f.publish_s,
            f.last_delivery_s
        );
        println!(
            "  {:.0} deliveries/s in total; publish -> delivery p50 {} µs, p99 {} µs",
            f.deliveries_per_s,
            us(f.delivery_p50_us),
            us(f.delivery_p99_us)
        );
    }
    super::groups::print(&report.groups);
    println!();
    for c in &report.checks {
        let numbers = match (c.measured, c.required) {
            (Some(measured), Some(required)) => format!(" (measured {measured:.2}, required {required:.2})"),
            _ => String::new(),
        };
        let verdict = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Info => "INFO",
            Verdict::Skip => "SKIP",
        };
        println!("{verdict} {}{numbers}; {}", c.target, c.detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: System, events_per_s: f64, p99_us: f64) -> PublishRow {
        let mut latency = Histogram::default();
        latency.record(Duration::from_secs_f64(p99_us / 1e6));
        let measured = Measured {
            events: (events_per_s * 10.0) as u64,
            window: Duration::from_secs(10),
            latency,
            connections: 16,
            ..Measured::default()
        };
        PublishRow::new(system, TARGET_CLIENTS, 100, &measured)
    }

    #[test]
    fn ratios_have_three_significant_digits_and_mark_equal_durability() {
        assert_eq!(format_ratio(2.3149), "2.31×");
        assert_eq!(format_ratio(7.9), "7.90×");
        assert_eq!(format_ratio(12.345), "12.3×");
        assert_eq!(format_ratio(123.4), "123×");
        let mut rows = vec![
            row(System::Edgebus, 2000.0, 1000.0),
            row(System::Nats, 1000.0, 2000.0),
            row(System::Postgres, 250.0, 4000.0),
        ];
        add_ratios(&mut rows);
        assert!(rows[1].ratios.is_empty(), "peers get no ratios");
        let ratios = &rows[0].ratios;
        assert_eq!(format_ratios(ratios, |r| Some(r.events_per_s)), "2.00× nats, 8.00× pg*");
        let p99 = format_ratios(ratios, |r| r.p99);
        assert!(p99.starts_with("0.50× nats, 0.25× pg*"), "{p99}");
    }

    #[test]
    fn targets_compare_equal_durabilities_at_256_clients() {
        // nats 2.9: the NATS targets use the relaxed node; the fsync-per-ack
        // node against nats is information only.
        let mut rows = vec![
            row(System::Edgebus, 1500.0, 900.0),
            row(System::EdgebusRelaxed, 5000.0, 500.0),
            row(System::Nats, 2000.0, 600.0),
            row(System::Postgres, 200.0, 9000.0),
        ];
        add_ratios(&mut rows);
        let checks = check_targets(&rows);
        let verdicts: Vec<(Verdict, &str)> =
            checks.iter().filter(|c| c.target.contains("100 B")).map(|c| (c.verdict, c.target.as_str())).collect();
        assert_eq!(verdicts.len(), 4, "{verdicts:?}");
        assert_eq!(verdicts[0].0, Verdict::Pass, "2.5x nats >= 2x: {verdicts:?}");
        assert!(verdicts[0].1.contains("edgebus-relaxed >= 2x nats"), "{verdicts:?}");
        assert_eq!(verdicts[1].0, Verdict::Pass, "p99 500 <= 600: {verdicts:?}");
        assert_eq!(verdicts[2].0, Verdict::Info, "{verdicts:?}");
        assert_eq!(verdicts[3].0, Verdict::Pass, "7.5x postgres: {verdicts:?}");
        // The 1 KiB cells were not measured: nothing to compare.
        assert!(checks.iter().filter(|c| c.target.contains("1 KiB")).all(|c| c.verdict == Verdict::Skip));

        // A nats-server that fsyncs each write is the pair; postgres missing is a skip.
        let mut rows = vec![
            row(System::Edgebus, 1500.0, 900.0),
            row(System::NatsSync, 1000.0, 800.0),
            row(System::Nats, 9000.0, 100.0),
        ];
        add_ratios(&mut rows);
        let checks: Vec<Check> = check_targets(&rows).into_iter().filter(|c| c.target.contains("100 B")).collect();
        assert_eq!(checks[0].verdict, Verdict::Fail, "1.5x < 2x: {checks:?}");
        assert!(checks[0].target.contains("edgebus >= 2x nats-sync"), "{checks:?}");
        assert_eq!(checks[1].verdict, Verdict::Fail, "p99 900 > 800: {checks:?}");
        assert_eq!(checks[2].verdict, Verdict::Skip, "{checks:?}");
        assert_eq!(checks.len(), 3, "no information line when the pair is edgebus itself: {checks:?}");
    }
}

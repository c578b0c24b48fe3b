//! `edgebus demo --quick` (issue 8, the golden path in one command): two
//! sites, a primary and a backup gateway for `us`, an emulated WAN link,
//! alerts and sampled telemetry, the failover drill halfway; it must end
//! with every verdict check passed, exit 0 and leave no scratch data.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The quick demo takes about 15 s; a loaded machine gets room, a hang does not.
const DEMO_DEADLINE: Duration = Duration::from_secs(180);

/// The verdict's checks, as the demo names them.
const CHECKS: [&str; 6] = [
    "alerts sent = alerts received",
    "no duplicates",
    "telemetry sampled as configured",
    "route queue bounded",
    "failover gap",
    "alert latency",
];

#[test]
fn issue_8_the_quick_demo_runs_the_drill_and_passes_every_check() {
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgebus-node"))
        .args(["demo", "--quick", "--dir"])
        .arg(scratch.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start edgebus demo");
    let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        rx
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            break status;
        }
        if started.elapsed() > DEMO_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "edgebus demo --quick did not finish within {DEMO_DEADLINE:?}: {}",
                stdout.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = stdout.recv_timeout(Duration::from_secs(10)).expect("the demo's stdout");
    let err = stderr.recv_timeout(Duration::from_secs(10)).expect("the demo's stderr");
    let context = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(status.success(), "edgebus demo --quick failed ({status}):\n{context}");

    // The stats lines, once a second, in the familiar shape.
    let stats: Vec<&str> = out.lines().filter(|l| l.contains("local_queue=")).collect();
    assert!(stats.len() >= 5, "too few stats lines:\n{context}");
    for line in &stats {
        let summary = line.split_whitespace().filter(|w| w.contains('=')).take(4).collect::<Vec<_>>();
        let keys: Vec<&str> = summary.iter().filter_map(|w| w.split_once('=').map(|(k, _)| k)).collect();
        assert_eq!(keys, ["local_queue", "wan_queue", "dropped", "backpressure"], "{line}\n{context}");
        assert!(line.contains("| alerts sent=") && line.contains("| active="), "{line}\n{context}");
    }
    assert!(
        stats.iter().any(|l| l.contains("backpressure=throttled")),
        "the WAN never held telemetry back:\n{context}"
    );

    // The drill, as an operator would see it.
    assert!(out.contains("$ edgebus failover gw-us\n"), "no drill:\n{context}");
    assert!(out.contains("gateway gw-us down; traffic rerouted via gw-us-backup\n"), "no takeover:\n{context}");
    assert!(stats.iter().any(|l| l.ends_with("active=gw-us-backup")), "the backup never carried traffic:\n{context}");

    // The verdict: one passed line per check, none failed.
    let verdict: Vec<&str> = out.lines().filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL ")).collect();
    assert_eq!(verdict.len(), CHECKS.len(), "{context}");
    for (line, check) in verdict.iter().zip(CHECKS) {
        assert!(line.starts_with(&format!("PASS {check}: ")), "{line}\n{context}");
    }
    let gap = out.lines().find(|l| l.starts_with("PASS failover gap: ")).expect("a gap line");
    assert!(gap.contains("after gw-us-backup took the lease"), "{gap}");

    // The scratch directory is gone.
    let left: Vec<_> = std::fs::read_dir(scratch.path()).expect("read the scratch parent").collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
}

//! What operators read of a gateway's routes: the table of `edgebus
//! routes` and the route, lane, topic and inbound lines of `edgebus stats
//! -v`, both pure functions over the node's JSON (`/v1/routes`, the
//! `gateway` object of `/v1/stats`), so they are tested without a node.
//!
//! Durations come from the node (`stalled_for_ms`, `oldest_unacked_age_ms`),
//! never from this machine's clock, so a skewed clock here cannot misstate
//! them; instants are printed in UTC.

use serde_json::Value;

use crate::bench::machine::civil_from_days;
use crate::client_cmds::aligned;

/// `ms` since the epoch as `2026-05-04T13:07:42Z`.
pub(crate) fn utc_text(ms: u64) -> String {
    let seconds = ms / 1000;
    let days = i64::try_from(seconds / 86_400).expect("the date fits");
    let (year, month, day) = civil_from_days(days);
    let second_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// A duration for people: `850ms`, `4.2s`, `42s`, `3m07s`, `2h05m`, `3d04h`.
pub(crate) fn duration_text(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        10_000..60_000 => format!("{s}s"),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A byte count for people: `90 B`, `3.1 KiB`, `256 KiB`, `4.0 MiB`.
pub(crate) fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn text(object: &Value, key: &str) -> String {
    match object.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn number(object: &Value, key: &str) -> u64 {
    object.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// A lane's or route's health: `healthy`, `throttled`, or `stalled since
/// 2026-05-04T13:07:42Z (3m07s)`.
fn health_text(object: &Value) -> String {
    let health = object.get("health").and_then(Value::as_str).unwrap_or("unknown");
    match (health, object.get("stalled_since_ms").and_then(Value::as_u64)) {
        ("stalled", Some(since)) => {
            format!("stalled since {} ({})", utc_text(since), duration_text(number(object, "stalled_for_ms")))
        }
        (health, _) => health.to_owned(),
    }
}

/// Why a lane or route is throttled or stalled, as a phrase; empty when healthy.
fn reason_text(object: &Value) -> String {
    match text(object, "reason_text") {
        t if t.is_empty() => text(object, "reason"),
        t => t,
    }
}

/// The health with its reason, for one cell: `healthy`, `throttled: no
/// credit: …`, `stalled since … (…): no link: …`.
fn health_with_reason(object: &Value) -> String {
    match reason_text(object) {
        reason if reason.is_empty() => health_text(object),
        reason => format!("{}: {reason}", health_text(object)),
    }
}

fn backlog_text(lane: &Value) -> String {
    let backlog = number(lane, "backlog_positions");
    match lane.get("oldest_unacked_age_ms").and_then(Value::as_u64) {
        Some(age) if backlog > 0 => format!("{backlog} (oldest {})", duration_text(age)),
        _ => backlog.to_string(),
    }
}

fn in_flight_text(lane: &Value) -> String {
    format!("{} ev / {}", number(lane, "in_flight_events"), bytes_text(number(lane, "in_flight_bytes")))
}

/// The route's credit: its window, and how much of the granted credit was
/// in use while data waited (demand fulfillment).
fn credit_text(route: &Value) -> String {
    let (events, bytes) = (number(route, "window_events"), number(route, "window_bytes"));
    if events == 0 && bytes == 0 {
        return "-".to_owned();
    }
    let window = format!("{events} ev / {}", bytes_text(bytes));
    match route.get("demand_fulfillment").and_then(Value::as_f64) {
        Some(ratio) => format!("{window}, {:.0}% used", ratio * 100.0),
        None => window,
    }
}

fn p99_text(lane: &Value) -> String {
    lane.get("ack_p99_ms").and_then(Value::as_u64).map_or_else(|| "-".to_owned(), duration_text)
}

fn list<'a>(object: &'a Value, key: &str) -> &'a [Value] {
    object.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// The table of `edgebus routes`: one row per route and lane, then, for
/// each route without a link, its last error. `body` is `/v1/routes`.
pub fn routes_table(body: &Value) -> String {
    let routes = list(body, "routes");
    if routes.is_empty() {
        let site = text(body, "site");
        return format!("no routes at site {site} (add one with `edgebus routes add`)\n");
    }
    let mut rows = vec![
        ["ROUTE", "LANE", "REMOTE", "LINK", "STATE", "BACKLOG", "IN FLIGHT", "CREDIT", "ACK P99", "REASON"]
            .map(str::to_owned),
    ];
    let mut errors = String::new();
    for route in routes {
        for lane in list(route, "lanes") {
            rows.push([
                text(route, "route"),
                text(lane, "lane"),
                text(route, "remote_site"),
                text(route, "state"),
                health_text(lane),
                backlog_text(lane),
                in_flight_text(lane),
                credit_text(route),
                p99_text(lane),
                reason_text(lane),
            ]);
        }
        let error = text(route, "last_error");
        if !error.is_empty() && text(route, "state") != "connected" {
            errors.push_str(&format!(
                "route {}: {} reconnects, {} failures in a row, last error: {error}\n",
                text(route, "route"),
                number(route, "reconnects"),
                number(route, "failures")
            ));
        }
    }
    aligned(&rows) + &errors
}

/// The lines `edgebus stats -v` prints after the summary line: one per
/// route, lane, topic (per route) and inbound site, each kind aligned on
/// its own. `gateway` is the `gateway` object of `/v1/stats` (`None`: the
/// node runs no gateway).
pub fn gateway_lines(gateway: Option<&Value>) -> String {
    let Some(gateway) = gateway else {
        return "gateway  none (the node runs no gateway)\n".to_owned();
    };
    let routes = list(gateway, "routes");
    let mut out = String::new();
    if routes.is_empty() {
        out.push_str(&format!("routes   none at site {}\n", text(gateway, "site")));
    }
    let route_rows: Vec<[String; 7]> = routes
        .iter()
        .map(|r| {
            [
                "route".to_owned(),
                text(r, "route"),
                format!("remote={}", text(r, "remote_site")),
                format!("link={}", text(r, "state")),
                format!("reconnects={}", number(r, "reconnects")),
                format!("credit={}", credit_text(r)),
                format!("health={}", health_with_reason(r)),
            ]
        })
        .collect();
    out.push_str(&aligned(&route_rows));
    let lane_rows: Vec<[String; 9]> = routes
        .iter()
        .flat_map(|r| list(r, "lanes").iter().map(move |l| (r, l)))
        .map(|(r, l)| {
            [
                "lane".to_owned(),
                format!("{}/{}", text(r, "route"), text(l, "lane")),
                format!("backlog={}", backlog_text(l)),
                format!("in_flight={}", in_flight_text(l)),
                format!("buffered={}", number(l, "buffered_events")),
                format!("sent={}", number(l, "sent_events")),
                format!("acked={}", number(l, "acked_events")),
                format!("ack_p99={}", p99_text(l)),
                format!("health={}", health_with_reason(l)),
            ]
        })
        .collect();
    out.push_str(&aligned(&lane_rows));
    let topic_rows: Vec<[String; 6]> = routes
        .iter()
        .flat_map(|r| {
            let counts = r.get("topics_counts").and_then(Value::as_object).into_iter().flatten();
            counts.map(move |(topic, c)| {
                [
                    "topic".to_owned(),
                    format!("{}/{topic}", text(r, "route")),
                    format!("sent={}", number(c, "sent")),
                    format!("sampled={}", number(c, "sampled_out")),
                    format!("compacted={}", number(c, "compacted")),
                    format!("dropped={}", number(c, "dropped")),
                ]
            })
        })
        .collect();
    out.push_str(&aligned(&topic_rows));
    let inbound_rows: Vec<[String; 7]> = list(gateway, "inbound")
        .iter()
        .map(|i| {
            let p99 = i.get("latency_p99_ms").and_then(Value::as_u64).map_or_else(|| "-".to_owned(), duration_text);
            [
                "inbound".to_owned(),
                text(i, "site"),
                format!("sessions={}", number(i, "sessions")),
                format!("written={}", number(i, "events_written")),
                format!("duplicates={}", number(i, "duplicates")),
                format!("refused={}", number(i, "refused")),
                format!("latency_p99={p99}"),
            ]
        })
        .collect();
    out.push_str(&aligned(&inbound_rows));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A route as `/v1/routes` gives it: a stalled critical lane and a
    /// throttled bulk lane behind a link that is open-circuit.
    fn stalled_route() -> Value {
        json!({
            "route": "to-us", "remote_site": "us", "state": "open", "reconnects": 12, "failures": 7,
            "last_error": "127.0.0.1:9: cannot connect: connection refused",
            "window_events": 0, "window_bytes": 0, "demand_fulfillment": null,
            "health": "stalled", "stalled_since_ms": 1_780_000_000_000u64, "stalled_for_ms": 72_000,
            "reason": "open circuit", "reason_text": "no link: open circuit after 7 failed sessions",
            "lanes": [
                {"lane": "critical", "backlog_positions": 50_000, "oldest_unacked_age_ms": null,
                 "in_flight_events": 0, "in_flight_bytes": 0, "buffered_events": 0, "sent_events": 10,
                 "acked_events": 10, "ack_p99_ms": 5, "stall": "no link",
                 "health": "stalled", "stalled_since_ms": 1_780_000_000_000u64, "stalled_for_ms": 72_000,
                 "reason": "open circuit", "reason_text": "no link: open circuit after 7 failed sessions"},
                {"lane": "bulk", "backlog_positions": 0, "in_flight_events": 0, "in_flight_bytes": 0,
                 "buffered_events": 0, "sent_events": 0, "acked_events": 0, "ack_p99_ms": null, "stall": "none",
                 "health": "healthy", "stalled_since_ms": null, "reason": null, "reason_text": null}
            ],
            "topics_counts": {"alerts.>": {"sent": 10, "sampled_out": 0, "compacted": 0, "dropped": 0},
                              "telemetry.>": {"sent": 0, "sampled_out": 90, "compacted": 3, "dropped": 1}}
        })
    }

    fn throttled_route() -> Value {
        json!({
            "route": "to-ap", "remote_site": "ap", "state": "connected", "reconnects": 0, "failures": 0,
            "last_error": "", "window_events": 64, "window_bytes": 262_144, "demand_fulfillment": 0.93,
            "health": "throttled", "stalled_since_ms": null, "reason": "no credit",
            "reason_text": "no credit: the remote site grants none",
            "lanes": [
                {"lane": "default", "backlog_positions": 900, "oldest_unacked_age_ms": 3_200,
                 "in_flight_events": 64, "in_flight_bytes": 3_174, "buffered_events": 800, "sent_events": 5_000,
                 "acked_events": 4_936, "ack_p99_ms": 200, "stall": "no credit",
                 "health": "throttled", "stalled_since_ms": null, "reason": "no credit",
                 "reason_text": "no credit: the remote site grants none"}
            ],
            "topics_counts": {}
        })
    }

    #[test]
    fn instants_durations_and_sizes_read_well() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400_000 + 3_723_999), "2000-02-29T01:02:03Z");
        let durations = [
            (0, "0ms"),
            (850, "850ms"),
            (4_250, "4.2s"),
            (42_000, "42s"),
            (187_000, "3m07s"),
            (7_500_000, "2h05m"),
            (273_600_000, "3d04h"),
        ];
        for (ms, expected) in durations {
            assert_eq!(duration_text(ms), expected, "{ms} ms");
        }
        let sizes =
            [(90, "90 B"), (3_174, "3.1 KiB"), (262_144, "256 KiB"), (4 << 20, "4 MiB"), (1_610_612_736, "1.5 GiB")];
        for (bytes, expected) in sizes {
            assert_eq!(bytes_text(bytes), expected, "{bytes} B");
        }
    }

    #[test]
    fn the_routes_table_has_a_row_per_lane_with_its_health_and_reason() {
        let body = json!({"site": "eu", "routes": [stalled_route(), throttled_route()]});
        let table = routes_table(&body);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "a header, three lanes, the open route's error: {table}");
        assert!(lines[0].starts_with("ROUTE  LANE      REMOTE  LINK       STATE"), "{table}");
        fn columns(line: &str) -> Vec<&str> {
            line.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect()
        }
        assert_eq!(
            columns(lines[1]),
            [
                "to-us",
                "critical",
                "us",
                "open",
                "stalled since 2026-05-28T20:26:40Z (1m12s)",
                "50000",
                "0 ev / 0 B",
                "-",
                "5ms",
                "no link: open circuit after 7 failed sessions"
            ]
        );
        assert_eq!(columns(lines[2]), ["to-us", "bulk", "us", "open", "healthy", "0", "0 ev / 0 B", "-", "-"]);
        assert_eq!(
            columns(lines[3]),
            [
                "to-ap",
                "default",
                "ap",
                "connected",
                "throttled",
                "900 (oldest 3.2s)",
                "64 ev / 3.1 KiB",
                "64 ev / 256 KiB, 93% used",
                "200ms",
                "no credit: the remote site grants none"
            ]
        );
        // Every column starts at the same offset on every line.
        let state_at = lines[0].find("STATE").unwrap();
        assert!(
            lines[1..4].iter().all(|l| l[state_at..].starts_with("stalled")
                || l[state_at..].starts_with("healthy")
                || l[state_at..].starts_with("throttled")),
            "{table}"
        );
        assert_eq!(
            lines[4],
            "route to-us: 12 reconnects, 7 failures in a row, last error: 127.0.0.1:9: cannot connect: connection refused"
        );
    }

    #[test]
    fn a_gateway_without_routes_says_so() {
        assert_eq!(
            routes_table(&json!({"site": "eu", "routes": []})),
            "no routes at site eu (add one with `edgebus routes add`)\n"
        );
        assert_eq!(gateway_lines(None), "gateway  none (the node runs no gateway)\n");
        let lines = gateway_lines(Some(&json!({"site": "eu", "routes": [], "inbound": []})));
        assert_eq!(lines, "routes   none at site eu\n");
    }

    #[test]
    fn stats_lines_give_each_route_lane_topic_and_inbound_site() {
        let gateway = json!({
            "site": "eu",
            "routes": [stalled_route(), throttled_route()],
            "inbound": [{"site": "ap", "sessions": 1, "events_written": 77, "duplicates": 2, "refused": 0,
                         "latency_p50_ms": 20, "latency_p99_ms": 50}],
        });
        let text = gateway_lines(Some(&gateway));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "route  to-us  remote=us  link=open       reconnects=12  credit=-                          health=stalled since 2026-05-28T20:26:40Z (1m12s): no link: open circuit after 7 failed sessions",
                "route  to-ap  remote=ap  link=connected  reconnects=0   credit=64 ev / 256 KiB, 93% used  health=throttled: no credit: the remote site grants none",
                "lane  to-us/critical  backlog=50000              in_flight=0 ev / 0 B       buffered=0    sent=10    acked=10    ack_p99=5ms    health=stalled since 2026-05-28T20:26:40Z (1m12s): no link: open circuit after 7 failed sessions",
                "lane  to-us/bulk      backlog=0                  in_flight=0 ev / 0 B       buffered=0    sent=0     acked=0     ack_p99=-      health=healthy",
                "lane  to-ap/default   backlog=900 (oldest 3.2s)  in_flight=64 ev / 3.1 KiB  buffered=800  sent=5000  acked=4936  ack_p99=200ms  health=throttled: no credit: the remote site grants none",
                "topic  to-us/alerts.>     sent=10  sampled=0   compacted=0  dropped=0",
                "topic  to-us/telemetry.>  sent=0   sampled=90  compacted=3  dropped=1",
                "inbound  ap  sessions=1  written=77  duplicates=2  refused=0  latency_p99=50ms",
            ]
        );
    }
}

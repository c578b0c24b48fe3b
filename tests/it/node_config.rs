//! `edgebus serve --config FILE` over the real binary: the file's settings
//! apply, and each is overridden by its `EDGEBUS_*` variable, which a flag
//! overrides in turn; a file with an unknown key or a bad value, or no file
//! at all, stops the node with a message naming the problem.
//!
//! Precedence over listen addresses is shown with a port this test holds
//! bound: a layer that should lose names it, so if it won the node could
//! not start.

use std::net::TcpListener;
use std::path::Path;

use crate::node::{Node, http_request, serve_fails};

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the config file");
    path.to_str().expect("a UTF-8 temporary path").to_owned()
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// The `data=` field of a ready line.
fn ready_data(ready: &str) -> &str {
    ready.split_once(" data=").map(|(_, data)| data).unwrap_or_else(|| panic!("no data= in {ready:?}"))
}

#[test]
fn a_config_file_sets_the_data_dir_listen_addresses_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("from-file");
    let config = write_config(
        dir.path(),
        "edgebus.toml",
        &format!(
            "# a node for the test\ndata_dir = {:?}\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
             fsync = \"interval(5ms)\"\n\n[limits]\nmax_connections = 2\nmax_subscriptions = 10\n",
            text(&data_dir)
        ),
    );
    let (node, ready) = Node::start_with(&["--config", &config], &[]);
    assert_eq!(ready_data(&ready), text(&data_dir), "{ready}");
    assert!(data_dir.is_dir(), "the node created its data directory");
    // Port 0 from the file, not the default ports.
    assert!(node.grpc.ip().is_loopback() && node.grpc.port() != 7290, "{ready}");
    assert!(node.http.ip().is_loopback() && node.http.port() != 7291, "{ready}");
    assert_eq!(http_request(node.http, "GET", "/healthz", &[], b"").status, 200);

    // max_connections = 2: with two idle connections open, a third is refused.
    let idle: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(node.http).expect("connect")).collect();
    let refused = http_request(node.http, "GET", "/healthz", &[], b"");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("the node serves at most 2"), "{refused:?}");
    drop(idle);
    node.stop();
}

#[test]
fn a_variable_beats_the_file_and_a_flag_beats_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let taken = taken.local_addr().unwrap().to_string();
    let (file_dir, env_dir, flag_dir) = (dir.path().join("file"), dir.path().join("env"), dir.path().join("flag"));
    let config = write_config(
        dir.path(),
        "edgebus.toml",
        &format!("data_dir = {:?}\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = {taken:?}\n", text(&file_dir)),
    );

    // The variables beat the file: the data dir, and an HTTP address other
    // than the file's (which is taken, so the file cannot have won).
    let envs = [
        ("EDGEBUS_CONFIG", config.as_str()),
        ("EDGEBUS_DATA_DIR", text(&env_dir)),
        ("EDGEBUS_HTTP_LISTEN", "127.0.0.1:0"),
    ];
    let (node, ready) = Node::start_with(&[], &envs);
    assert_eq!(ready_data(&ready), text(&env_dir), "{ready}");
    assert_eq!(http_request(node.http, "GET", "/readyz", &[], b"").status, 200);
    node.stop();
    assert!(!file_dir.exists(), "the file's data dir was not used");

    // The flags beat the variables, which now name the taken port.
    let envs = [
        ("EDGEBUS_CONFIG", config.as_str()),
        ("EDGEBUS_DATA_DIR", text(&env_dir)),
        ("EDGEBUS_HTTP_LISTEN", taken.as_str()),
    ];
    let (node, ready) = Node::start_with(&["--data-dir", text(&flag_dir), "--http-listen", "127.0.0.1:0"], &envs);
    assert_eq!(ready_data(&ready), text(&flag_dir), "{ready}");
    assert_eq!(http_request(node.http, "GET", "/readyz", &[], b"").status, 200);
    node.stop();
}

#[test]
fn a_bad_config_stops_the_node_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let listen = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir", text(&data_dir)];
    let cases = [
        (
            "unknown-key.toml",
            "data_dir = \"d\"\ngrpc_lisen = \"127.0.0.1:0\"\n",
            "line 2, column 1: unknown field `grpc_lisen`",
        ),
        (
            "bad-value.toml",
            "grpc_listen = \"nope\"\n",
            "line 1, column 15: grpc_listen: \"nope\" is not a socket address",
        ),
        (
            "bad-type.toml",
            "[limits]\nmax_connections = \"many\"\n",
            "line 2, column 19: limits.max_connections: invalid type",
        ),
        ("zero.toml", "[limits]\nmax_connections = 0\n", "limits.max_connections: must be at least 1"),
        ("syntax.toml", "fsync = always\n", "line 1, column 9: "),
    ];
    for (name, contents, needle) in cases {
        let config = write_config(dir.path(), name, contents);
        // Flags for every setting: the file is still read, and still refused.
        let args: Vec<&str> = ["--config", config.as_str()].into_iter().chain(listen).collect();
        let (status, stderr) = serve_fails(&args, &[]);
        assert_eq!(status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(&format!("error: invalid config file {config}, ")), "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {needle:?} in {stderr}");
    }

    // A file that does not exist, named by the flag or the variable.
    let missing = dir.path().join("missing.toml");
    let (status, stderr) = serve_fails(&["--config", text(&missing)], &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot read config file {}: ", missing.display())), "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
    let (status, stderr) = serve_fails(&listen, &[("EDGEBUS_CONFIG", text(&missing))]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot read config file {}", missing.display())), "{stderr}");
    assert!(!data_dir.exists(), "no refused start touched the data dir");
}

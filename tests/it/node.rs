//! A real `edgebus serve` process for the node scenarios: started on
//! 127.0.0.1:0 with its addresses read from the ready line, stopped with
//! SIGTERM and a bounded wait; and a plain HTTP/1.1 client over `TcpStream`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a node may take to start or to stop before the test fails.
pub const NODE_DEADLINE: Duration = Duration::from_secs(60);

pub struct Node {
    /// `None` once stopped; a node still running when dropped (a failed
    /// test) is killed, so no node outlives its test.
    child: Option<Child>,
    /// Bound gRPC address.
    pub grpc: SocketAddr,
    /// Bound HTTP address.
    pub http: SocketAddr,
    /// Bound WAN address of the site's gateway, if the node runs one.
    pub wan: Option<SocketAddr>,
}

impl Node {
    /// Starts a node on `data_dir` and waits for its ready line.
    pub fn start(data_dir: &Path) -> Self {
        let data_dir_arg = data_dir.to_str().expect("a UTF-8 data dir");
        let args = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir", data_dir_arg];
        let (node, ready) = Self::start_with(&args, &[]);
        assert!(ready.contains(&format!("data={}", data_dir.display())), "{ready:?}");
        node
    }

    /// Starts `edgebus serve ARGS` with the environment variables `envs`
    /// (and no other `EDGEBUS_*` variable) and waits for its ready line,
    /// which it also answers. Unlike [`Node::start`], it adds no arguments:
    /// the caller says where to listen and where the data goes.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> (Self, String) {
        let mut command = serve_command(args, envs);
        // A fork holds copies of this process's descriptors until its exec,
        // log locks included: no log opens meanwhile (see `guarded`).
        let starting = edgebus_tests::guarded::starting_child();
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start edgebus serve");
        drop(starting);
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = match lines.recv_timeout(NODE_DEADLINE) {
            Ok(ready) => ready,
            Err(error) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("the node prints its ready line ({error}; exit: {status:?}; args {args:?}, env {envs:?})")
            }
        };
        assert!(ready.starts_with("edgebus ready "), "{ready:?}");
        let field = |name: &str| -> SocketAddr {
            let prefix = format!("{name}=");
            ready
                .split_whitespace()
                .find_map(|word| word.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {name}= in {ready:?}"))
                .parse()
                .expect("an address")
        };
        let wan = ready
            .split_whitespace()
            .find_map(|word| word.strip_prefix("wan="))
            .map(|addr| addr.parse().unwrap_or_else(|e| panic!("wan={addr} in {ready:?} is not an address: {e}")));
        let node = Self { grpc: field("grpc"), http: field("http"), wan, child: Some(child) };
        (node, ready)
    }

    /// The node's process id (for `/proc` figures such as its RSS).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running node").id()
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("a node is stopped once");
        assert!(send_sigterm(child.id()), "SIGTERM delivered");
        let (sender, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(child.wait());
        });
        let status = exited.recv_timeout(NODE_DEADLINE).expect("the node exits after SIGTERM").expect("wait");
        assert!(status.success(), "a drained node exits 0, got {status}");
    }
}

impl Node {
    /// SIGKILL (`kill -9`), then wait for the process to be gone: nothing
    /// runs its shutdown, as in a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("a node is stopped once");
        child.kill().expect("SIGKILL delivered");
        child.wait().expect("wait for the killed node");
    }

    /// SIGSTOP: the process stays, frozen, with its sockets open.
    pub fn pause(&self) {
        assert!(send_signal("STOP", self.pid()), "SIGSTOP delivered");
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) {
        assert!(send_signal("CONT", self.pid()), "SIGCONT delivered");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `edgebus serve ARGS` with the variables `envs` and no other `EDGEBUS_*`
/// variable, so that the test's own environment cannot change the outcome.
pub fn serve_command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgebus-node"));
    command.arg("serve").args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBUS_") {
            command.env_remove(name);
        }
    }
    command.envs(envs.iter().copied());
    command
}

/// Runs `edgebus serve ARGS` with `envs`, expecting it to fail before it is
/// ready; answers its exit status and its stderr. Kills it and fails the
/// test if it is still running after [`NODE_DEADLINE`].
pub fn serve_fails(args: &[&str], envs: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    run_expecting_exit(serve_command(args, envs), &format!("edgebus serve {args:?}"))
}

/// Runs `command`, which is expected to exit by itself; answers its exit
/// status and its stderr. Kills it and fails the test if it is still
/// running after [`NODE_DEADLINE`].
pub fn run_expecting_exit(mut command: Command, what: &str) -> (std::process::ExitStatus, String) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start the process");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (sender, read) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = sender.send(text);
    });
    let Ok(stderr) = read.recv_timeout(NODE_DEADLINE) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} kept running; it was expected to fail");
    };
    // stderr closed: the process has exited or is exiting.
    let status = child.wait().expect("wait for the process");
    (status, stderr)
}

/// Sends SIGTERM through the `kill` command, keeping `unsafe` out of the tests.
fn send_sigterm(pid: u32) -> bool {
    send_signal("TERM", pid)
}

/// Sends `SIGNAL` (a name such as `TERM`) through the `kill` command.
fn send_signal(signal: &str, pid: u32) -> bool {
    Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().is_ok_and(|s| s.success())
}

/// A `GET` over a fresh connection; the whole response, head and body.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to HTTP");
    stream.set_read_timeout(Some(NODE_DEADLINE)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: edgebus\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the HTTP response");
    response
}

/// A request over a fresh connection with `Connection: close`; `extra_headers`
/// are whole header lines. Answers the status code, the head's lines and the
/// body.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, extra_headers: &[&str], body: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).expect("connect to HTTP");
    stream.set_read_timeout(Some(NODE_DEADLINE)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: edgebus\r\nConnection: close\r\n");
    for line in extra_headers {
        head.push_str(line);
        head.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading the whole body and close.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    HttpResponse::parse(&response)
}

/// Sends `request`, a whole raw HTTP/1.1 request that asks for
/// `Connection: close`, over a fresh connection and reads the response
/// until the server closes; an error (never a panic) if the connection
/// fails, no answer comes within `timeout`, or the answer is not HTTP.
pub fn http_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<HttpResponse, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    // The server may answer before reading the whole request and close.
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    if let Err(error) = stream.read_to_end(&mut response) {
        // A reset after a complete answer still counts as that answer.
        if response.is_empty() {
            return Err(format!("no answer within {timeout:?}: {error}"));
        }
    }
    HttpResponse::try_parse(&response)
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, as sent.
    pub headers: Vec<String>,
    /// Body (de-chunked).
    pub body: String,
}

impl HttpResponse {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head in {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("a status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<String> = lines.map(str::to_owned).collect();
        let chunked = headers.iter().any(|h| h.eq_ignore_ascii_case("transfer-encoding: chunked"));
        let body = if chunked { dechunk(body) } else { body.to_owned() };
        Self { status, headers, body }
    }

    /// Parses `raw`, or says why it is not an HTTP/1.1 response.
    pub fn try_parse(raw: &[u8]) -> Result<Self, String> {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no end of head in {text:?}"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<String> = lines.map(str::to_owned).collect();
        let chunked = headers.iter().any(|h| h.eq_ignore_ascii_case("transfer-encoding: chunked"));
        let body = if chunked { try_dechunk(body)? } else { body.to_owned() };
        Ok(Self { status, headers, body })
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

fn try_dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").ok_or("no chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or("a chunk shorter than its size")?);
        body = rest.get(size + 2..).ok_or("no end of chunk")?;
    }
}

/// The resident memory of process `pid` (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// User and system CPU time process `pid` has used, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the node's /proc stat");
    // After the command (which may hold spaces): state is the 3rd field,
    // utime and stime the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).expect("a command in /proc/PID/stat");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).expect("utime and stime");
    ticks(11) + ticks(12)
}

//! Running `selvedge-lab-app` in pods and reading its one-line JSON reports.

use std::{net::SocketAddr, process::Command};

use serde::Deserialize;

use crate::lab::Lab;

/// The bytes `send` writes: byte i is a function of i, so corruption and reordering show,
/// and tests can look for them on the wire.
pub fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// How the test client does its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Blocking socket, one thread writing and one reading.
    Blocking,
    /// Non-blocking socket driven by poll(2), like Go, tokio, nginx, Java NIO.
    EventLoop,
    /// An event loop that writes half, pauses this many milliseconds, writes the rest.
    EventLoopSplit(u64),
}

/// What `send` / `send-poll` report.
#[derive(Debug, Clone, Deserialize)]
pub struct Transfer {
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// Where the client's socket is really connected (the kernel's table): the agent's
    /// 127.0.0.1:15001 when captured.
    #[serde(default)]
    pub wire_peer: Option<SocketAddr>,
    pub sent: usize,
    pub received: usize,
    pub sent_sha256: String,
    pub received_sha256: String,
    pub write_error: Option<String>,
    pub read_error: Option<String>,
}

impl Transfer {
    /// As [`Ask::captured`].
    pub fn captured(&self) -> bool {
        is_capture_listener(self.wire_peer)
    }

    /// Every byte came back, in order.
    pub fn is_exact(&self) -> bool {
        self.sent == self.received
            && self.sent_sha256 == self.received_sha256
            && self.write_error.is_none()
            && self.read_error.is_none()
    }
}

/// What `ask` reports: our view of the connection and the whoami server's.
#[derive(Debug, Clone, Deserialize)]
pub struct Ask {
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// As [`Transfer::wire_peer`].
    #[serde(default)]
    pub wire_peer: Option<SocketAddr>,
    pub server: Option<ServerView>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerView {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The connection's other end is a socket in the server's own pod: the agent delivered
    /// it there (the app sees the client's address all the same).
    #[serde(default)]
    pub peer_in_pod: bool,
}

/// The agent's outbound listener, where a captured connect really goes.
pub fn is_capture_listener(a: Option<SocketAddr>) -> bool {
    a.is_some_and(|a| a.ip().to_canonical().is_loopback() && a.port() == 15001)
}

impl Ask {
    /// The app's connect went to its agent (the kernel's view, whatever `getpeername` says).
    pub fn captured(&self) -> bool {
        is_capture_listener(self.wire_peer)
    }

    pub fn server(&self) -> &ServerView {
        self.server.as_ref().unwrap_or_else(|| panic!("server sent no report: {self:?}"))
    }
}

/// A failed client run: the error the app printed.
#[derive(Debug, Clone, Deserialize)]
pub struct Failure {
    pub error: String,
}

impl Lab {
    fn app(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.env.app);
        c.args(args);
        c
    }

    /// Start a server (`echo` or `whoami`) in `pod` on `port` and wait until it says it is
    /// listening (its first stdout line).
    pub fn serve(&mut self, pod: &str, kind: &str, port: u16) {
        let cmd = self.app(&[kind, &port.to_string()]);
        let pid = self.spawn_in_pod(pod, cmd);
        let addr = self.get(pod).addr(port);
        let line = self.child_first_line(pid, std::time::Duration::from_secs(30));
        assert!(
            line.contains("listening"),
            "{kind} server on {addr} did not start: {line:?} {}",
            self.child_stderr(pid)
        );
    }

    /// Start a `selvedge-lab-app` server (`args`: its mode, port and any more) in `pod`;
    /// returns once it listens.
    pub fn serve_args(&mut self, pod: &str, args: &[&str]) {
        let pid = self.spawn_app(pod, args);
        let line = self.child_first_line(pid, std::time::Duration::from_secs(30));
        assert!(line.contains("listening"), "{args:?} in {pod} did not start: {line:?} {}", self.child_stderr(pid));
    }

    /// Start `selvedge-lab-app ARGS` in `pod` in the background; returns its pid (its
    /// report: `child_first_line`).
    pub fn spawn_app(&mut self, pod: &str, args: &[&str]) -> u32 {
        let cmd = self.app(args);
        self.spawn_in_pod(pod, cmd)
    }

    /// `ask` from `pod` to `to`: Ok(report) or Err(the connect error).
    pub fn ask(&self, pod: &str, to: SocketAddr) -> Result<Ask, String> {
        parse(&self.run_in_pod(pod, self.app(&["ask", &to.to_string()])))
    }

    /// `ask` from `node` itself (its network namespace, like the kubelet).
    pub fn ask_on_node(&self, node: &str, to: SocketAddr) -> Result<Ask, String> {
        let ns = self.node_netns(node);
        parse(&self.run_in_netns(&ns, self.app(&["ask", &to.to_string()])))
    }

    /// `ask` from a host process inside `pod`'s netns (not in the pod's cgroup).
    pub fn ask_as_host(&self, pod: &str, to: SocketAddr) -> Result<Ask, String> {
        parse(&self.run_in_pod_netns_as_host(pod, self.app(&["ask", &to.to_string()])))
    }

    /// Send `bytes` to an echo server and read them back.
    pub fn transfer(&self, pod: &str, to: SocketAddr, bytes: usize) -> Result<Transfer, String> {
        self.transfer_with(Client::Blocking, pod, to, bytes)
    }

    pub fn transfer_with(&self, client: Client, pod: &str, to: SocketAddr, bytes: usize) -> Result<Transfer, String> {
        let (to, bytes) = (to.to_string(), bytes.to_string());
        let args: Vec<String> = match client {
            Client::Blocking => vec!["send".into(), to, bytes],
            Client::EventLoop => vec!["send-poll".into(), to, bytes],
            Client::EventLoopSplit(ms) => vec!["send-split".into(), to, bytes, ms.to_string()],
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        parse(&self.run_in_pod(pod, self.app(&args)))
    }

    /// `n` connects from `pod` to a refusing `to`: (microseconds, "connect"|"read") each.
    pub fn refusal_times(&self, pod: &str, to: SocketAddr, n: usize) -> Vec<(u64, String)> {
        let out = self.run_in_pod(pod, self.app(&["refusal-time", &to.to_string(), &n.to_string()]));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let micros = v["micros"].as_array().cloned().unwrap_or_default();
        let how = v["refused_at"].as_array().cloned().unwrap_or_default();
        micros
            .iter()
            .zip(how.iter())
            .map(|(m, h)| (m.as_u64().unwrap_or(0), h.as_str().unwrap_or_default().to_string()))
            .collect()
    }

    /// Start a split transfer in the background (first half, a pause of `pause_ms`, the
    /// rest); returns its pid for [`finish_transfer`](Self::finish_transfer).
    pub fn start_transfer(&mut self, pod: &str, to: SocketAddr, bytes: usize, pause_ms: u64) -> u32 {
        let cmd = self.app(&["send-split", &to.to_string(), &bytes.to_string(), &pause_ms.to_string()]);
        self.spawn_in_pod(pod, cmd)
    }

    /// Wait for a transfer started by `start_transfer` and read its report.
    pub fn finish_transfer(&mut self, pid: u32) -> Result<Transfer, String> {
        let line = self.child_first_line(pid, std::time::Duration::from_secs(60));
        parse(&line)
    }

    /// An HBONE request from `pod` to `to`'s listener, presenting `cert` as `identity`:
    /// Ok(HTTP status) or Err(why it ended).
    pub fn hbone_probe(
        &self,
        pod: &str,
        to: SocketAddr,
        identity: &str,
        cert: &str,
        method: &str,
        target: SocketAddr,
    ) -> Result<u16, String> {
        let ca = self.dir.join("ca");
        let out = self.run_in_pod(
            pod,
            self.app(&[
                "hbone-probe",
                &to.to_string(),
                &ca.to_string_lossy(),
                identity,
                cert,
                method,
                &target.to_string(),
            ]),
        );
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad report {out:?}: {e}"));
        match (v.get("status").and_then(|s| s.as_u64()), v.get("error")) {
            (Some(s), _) => Ok(u16::try_from(s).unwrap_or(0)),
            (None, Some(e)) => Err(e.as_str().unwrap_or_default().to_string()),
            _ => panic!("bad report {out:?}"),
        }
    }

    /// Try to bind `port` in `pod`: Ok(()) or Err(message).
    pub fn bind_in_pod(&self, pod: &str, port: u16) -> Result<(), String> {
        let out = self.run_in_pod(pod, self.app(&["bind", &port.to_string()]));
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad report {out:?}: {e}"));
        match v.get("error") {
            Some(e) => Err(e.as_str().unwrap_or_default().to_string()),
            None => Ok(()),
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(out: &str) -> Result<T, String> {
    let line = out.trim();
    if let Ok(f) = serde_json::from_str::<Failure>(line) {
        return Err(f.error);
    }
    serde_json::from_str(line).map_err(|e| panic!("bad report {line:?}: {e}"))
}

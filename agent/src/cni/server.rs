//! The agent's end of the CNI socket: each request goes to the run loop, which owns the
//! enrollment state; the answer goes back on the same connection.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use super::protocol::{Request, Response};

/// A request and where its answer goes.
pub type Pending = (Request, oneshot::Sender<Response>);

/// How long the agent may take to answer (the plugin waits a little longer).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_REQUEST: usize = 64 * 1024;

/// Bind the socket (root only), replacing a stale one left by a previous agent.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accept forever, handing each request to `to_agent`.
pub async fn serve(listener: UnixListener, to_agent: mpsc::Sender<Pending>) {
    loop {
        let (stream, _) = crate::accept::next("CNI socket", || listener.accept()).await;
        let to_agent = to_agent.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r).take(MAX_REQUEST as u64);
            let answer = match r.read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => ask(req, &to_agent).await,
                    Err(e) => Response::Refused { reason: format!("bad request: {e}") },
                },
                Err(e) => Response::Refused { reason: format!("reading the request: {e}") },
            };
            let mut out = serde_json::to_vec(&answer).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

async fn ask(req: Request, to_agent: &mpsc::Sender<Pending>) -> Response {
    let pod = req.pod().to_string();
    let (tx, rx) = oneshot::channel();
    if to_agent.send((req, tx)).await.is_err() {
        return Response::Refused { reason: "the agent is shutting down".into() };
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Response::Refused { reason: format!("pod {pod}: the agent dropped the request") },
        Err(_) => Response::Refused { reason: format!("pod {pod}: not enrolled within {}s", ANSWER_TIMEOUT.as_secs()) },
    }
}

//! A root rotation without a restart, over real TLS on loopback: the bundle gains the new
//! root, the leaves are re-issued by it, the old root goes — new handshakes work at every
//! step, a connection opened before the rotation keeps working, and a leaf of the removed
//! root is refused at the end.

use std::{path::Path, sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::{new_key, BuiltinCa, FilesSource, IdentityManager, SpiffeId};

const TD: &str = "cluster.local";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "shop", sa).unwrap()
}

/// Write `sa`'s chain and key, issued by `ca`, where a files source reads them.
fn issue(dir: &Path, ca: &BuiltinCa, sa: &str) {
    let key = new_key().unwrap();
    let cert = ca.issue_pem(&id(sa), &key, Duration::from_secs(3600)).unwrap();
    let d = dir.join("shop").join(sa);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("cert-chain.pem"), cert).unwrap();
    std::fs::write(d.join("key.pem"), key.serialize_pem()).unwrap();
}

fn bundle(dir: &Path, roots: &[&BuiltinCa]) {
    let pem: String = roots.iter().map(|r| r.root_pem()).collect();
    std::fs::write(dir.join("root-cert.pem"), pem).unwrap();
}

/// A files-sourced manager for web and db over `dir`.
async fn manager(dir: &Path) -> Arc<IdentityManager> {
    let provider = Arc::new(crate::tls::crypto_provider());
    let ids = IdentityManager::new(Arc::new(FilesSource::new(dir).unwrap()), provider, TD).unwrap();
    ids.acquire(&id("web")).await.unwrap();
    ids.acquire(&id("db")).await.unwrap();
    ids
}

/// One exchange over a new mTLS connection: web (client, `client_ids`) to db (server).
async fn handshake(server: &TlsAcceptor, client_ids: &Arc<IdentityManager>) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = server.clone();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())
    });
    let cfg = crate::tls::client_config(client_ids, &id("web"), &id("db"), 0).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let result = async {
        let mut tls = TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    }
    .await;
    let server_side = served.await.unwrap();
    result.and(server_side)
}

#[tokio::test]
async fn a_root_rotation_needs_no_restart_and_drops_no_connection() {
    let base = std::env::temp_dir().join(format!("selvedge-rotation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (old, new) = (base.join("old"), base.join("new"));
    BuiltinCa::init(&old, TD).unwrap();
    BuiltinCa::init(&new, TD).unwrap();
    let (old, new) = (BuiltinCa::load(&old).unwrap(), BuiltinCa::load(&new).unwrap());
    let files = base.join("files");
    std::fs::create_dir_all(&files).unwrap();
    bundle(&files, &[&old]);
    issue(&files, &old, "web");
    issue(&files, &old, "db");
    let ids = manager(&files).await;
    let server = TlsAcceptor::from(crate::tls::server_config(&ids, &id("db")).unwrap());
    handshake(&server, &ids).await.expect("before the rotation");

    // A connection opened now must outlive the rotation.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = server.clone();
    let echo = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut b = [0u8; 1];
        while tls.read_exact(&mut b).await.is_ok() {
            if tls.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let cfg = crate::tls::client_config(&ids, &id("web"), &id("db"), 0).unwrap();
    let mut open = TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(addr.ip().into()), TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    let round_trip = async |open: &mut tokio_rustls::client::TlsStream<TcpStream>| {
        open.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        open.read_exact(&mut b).await.unwrap();
    };

    // 1. Both roots trusted.
    bundle(&files, &[&old, &new]);
    assert!(ids.refresh_roots(), "the new bundle is taken");
    handshake(&server, &ids).await.expect("old leaves, both roots");
    round_trip(&mut open).await;
    // 2. The leaves re-issued by the new root (a files source reloads changed files).
    tokio::time::sleep(Duration::from_millis(20)).await;
    issue(&files, &new, "web");
    issue(&files, &new, "db");
    ids.refresh().await;
    handshake(&server, &ids).await.expect("new leaves, both roots");
    round_trip(&mut open).await;
    // 3. The old root removed.
    bundle(&files, &[&new]);
    assert!(ids.refresh_roots());
    handshake(&server, &ids).await.expect("new leaves, the new root only");
    round_trip(&mut open).await;

    // A client still on the old root's leaf is refused now.
    let stale = base.join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    bundle(&stale, &[&old, &new]);
    issue(&stale, &old, "web");
    issue(&stale, &old, "db");
    let stale_ids = manager(&stale).await;
    handshake(&server, &stale_ids).await.expect_err("a leaf of the removed root");
    // And a half-written bundle changes nothing.
    std::fs::write(files.join("root-cert.pem"), "").unwrap();
    assert!(!ids.refresh_roots(), "an empty bundle keeps the one in force");
    handshake(&server, &ids).await.expect("still the new root");

    drop(open);
    let _ = echo.await;
    std::fs::remove_dir_all(&base).unwrap();
}

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::Arc,
};

use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    CipherSuite, ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

use super::*;

fn same_suite(a: SupportedCipherSuite, b: SupportedCipherSuite) -> bool {
    match (a, b) {
        (SupportedCipherSuite::Tls13(a), SupportedCipherSuite::Tls13(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// ring's suite, from the statics `provider_with` takes it from: a suite is told by the
/// address of its description, and ring's default provider lists copies of these whose
/// descriptions a release build may place elsewhere (the comparison failed there).
fn ring_suite(id: CipherSuite) -> SupportedCipherSuite {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    [TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256].into_iter().find(|s| s.suite() == id).unwrap()
}

#[test]
fn only_the_aes_gcm_suites_change_hands_and_the_order_is_kept() {
    let aws = rustls::crypto::aws_lc_rs::default_provider();
    let ids = |p: &CryptoProvider| p.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>();
    let mixed = provider_with(AesGcm::RingVaesAvx2);
    assert_eq!(ids(&mixed), ids(&aws));
    let mut swapped = 0;
    for (m, a) in mixed.cipher_suites.iter().zip(&aws.cipher_suites) {
        let tls13_aes =
            matches!(a.suite(), CipherSuite::TLS13_AES_256_GCM_SHA384 | CipherSuite::TLS13_AES_128_GCM_SHA256);
        if tls13_aes {
            assert!(same_suite(*m, ring_suite(a.suite())), "{:?} is ring's", a.suite());
            swapped += 1;
        } else {
            assert_eq!(format!("{m:?}"), format!("{a:?}"), "{:?} is left alone", a.suite());
        }
    }
    assert_eq!(swapped, 2);
    assert_eq!(mixed.kx_groups.len(), aws.kx_groups.len());

    let plain = provider_with(AesGcm::AwsLc);
    assert_eq!(ids(&plain), ids(&aws));
    assert!(plain.cipher_suites.iter().zip(&aws.cipher_suites).all(|(p, a)| format!("{p:?}") == format!("{a:?}")));
}

/// A TLS 1.3 connection over loopback TCP, the client sealing with `client` and the server
/// with `server`, restricted to `suite`; each side sends `len` bytes and checks what it
/// got. Returns the suite each side negotiated.
fn carry(client: AesGcm, server: AesGcm, suite: CipherSuite, len: usize) -> [SupportedCipherSuite; 2] {
    let only = |aes| {
        let mut p = provider_with(aes);
        p.cipher_suites.retain(|s| s.suite() == suite);
        Arc::new(p)
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["selvedge.test".to_string()]).unwrap().self_signed(&key).unwrap();
    let server_cfg = ServerConfig::builder_with_provider(only(server))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client_cfg = ClientConfig::builder_with_provider(only(client))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let payload = move |seed: u8| (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut tls = StreamOwned::new(ServerConnection::new(Arc::new(server_cfg)).unwrap(), tcp);
        let mut got = vec![0; len];
        tls.read_exact(&mut got).unwrap();
        assert!(got == payload(1), "the server read what the client sent");
        tls.write_all(&payload(2)).unwrap();
        tls.flush().unwrap();
        tls.conn.negotiated_cipher_suite().unwrap()
    });
    let name = ServerName::try_from("selvedge.test").unwrap();
    let mut tls =
        StreamOwned::new(ClientConnection::new(Arc::new(client_cfg), name).unwrap(), TcpStream::connect(addr).unwrap());
    tls.write_all(&payload(1)).unwrap();
    let mut got = vec![0; len];
    tls.read_exact(&mut got).unwrap();
    assert!(got == payload(2), "the client read what the server sent");
    [tls.conn.negotiated_cipher_suite().unwrap(), server_side.join().unwrap()]
}

#[test]
fn records_sealed_by_either_implementation_open_with_the_other() {
    use AesGcm::{AwsLc, RingVaesAvx2};
    let aws = rustls::crypto::aws_lc_rs::default_provider();
    for suite in [CipherSuite::TLS13_AES_256_GCM_SHA384, CipherSuite::TLS13_AES_128_GCM_SHA256] {
        let aws_suite = *aws.cipher_suites.iter().find(|s| s.suite() == suite).unwrap();
        for (client, server) in [(RingVaesAvx2, AwsLc), (AwsLc, RingVaesAvx2), (RingVaesAvx2, RingVaesAvx2)] {
            // 1 MiB each way: 64 full records and the partial one, in both directions.
            let [c, s] = carry(client, server, suite, (1 << 20) + 1000);
            let expect = |aes| if aes == RingVaesAvx2 { ring_suite(suite) } else { aws_suite };
            assert!(same_suite(c, expect(client)), "{suite:?}: the client sealed with {}", client.name());
            assert!(same_suite(s, expect(server)), "{suite:?}: the server sealed with {}", server.name());
        }
    }
}

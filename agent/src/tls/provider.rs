//! The process's one rustls crypto provider: aws-lc-rs, with one exception chosen by CPU.
//!
//! aws-lc-rs seals and opens AES-GCM with the OpenSSL-derived AES-NI + PCLMULQDQ code,
//! or with its AVX-512 code where the CPU has AVX-512. On a CPU that has VAES and
//! VPCLMULQDQ with AVX2 but not AVX-512 (AMD Zen 3, Intel Alder Lake and later client
//! parts), ring has code aws-lc-rs lacks: it works on two blocks per instruction, and
//! seals 16 KiB records about twice as fast (6.8 against 3.4 GB/s for AES-256-GCM on the
//! lab machine's AMD EPYC). Every bulk byte through an agent is sealed once and opened
//! once, so on such a CPU the TLS 1.3 AES-GCM suites are ring's. The suites, their order,
//! the key exchange, signatures, certificate checks and tickets are aws-lc-rs's either
//! way, and the records on the wire are the same: a peer cannot tell which one sealed them.

use rustls::{crypto::CryptoProvider, SupportedCipherSuite};

/// Which implementation seals and opens AES-GCM records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AesGcm {
    AwsLc,
    /// ring's VAES + VPCLMULQDQ + AVX2 code.
    RingVaesAvx2,
}

impl AesGcm {
    /// The faster of the two on this CPU.
    pub fn for_this_cpu() -> Self {
        if wide_aes_without_avx512() {
            Self::RingVaesAvx2
        } else {
            Self::AwsLc
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::AwsLc => "aws-lc-rs",
            Self::RingVaesAvx2 => "ring (VAES, AVX2)",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn wide_aes_without_avx512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("vaes") && has!("vpclmulqdq") && has!("avx2") && !has!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn wide_aes_without_avx512() -> bool {
    false
}

/// The provider the agent uses everywhere (HBONE, the CA client, the Kubernetes client).
pub fn crypto_provider() -> CryptoProvider {
    provider_with(AesGcm::for_this_cpu())
}

/// aws-lc-rs's default provider with its TLS 1.3 AES-GCM suites sealed by `aes`.
pub fn provider_with(aes: AesGcm) -> CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if aes == AesGcm::RingVaesAvx2 {
        for suite in &mut provider.cipher_suites {
            *suite = ring_equivalent(*suite).unwrap_or(*suite);
        }
    }
    provider
}

/// ring's implementation of a TLS 1.3 AES-GCM suite; None for any other suite.
fn ring_equivalent(suite: SupportedCipherSuite) -> Option<SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    [TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256].into_iter().find(|r| r.suite() == suite.suite())
}

#[cfg(test)]
mod tests;

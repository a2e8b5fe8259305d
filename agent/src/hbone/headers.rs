//! What a CONNECT says besides its target, as ztunnel writes and reads it (pure):
//! `forwarded` (the client's address with its port, and the Service it dialled),
//! `baggage` (the source workload's metadata, for the destination's metrics when it does
//! not know the source), and `traceparent` (a W3C trace context, new for each stream).
//!
//! The peer's claims here are never identity: principals come from certificates only. They
//! only fill metric labels the destination cannot otherwise know.

use std::{
    hash::{BuildHasher, Hasher},
    net::SocketAddr,
    sync::Arc,
};

use http::{HeaderMap, HeaderValue};

use crate::state::WorkloadMeta;

pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// The headers one stream's CONNECT carries.
#[derive(Debug, Clone)]
pub struct ConnectHeaders {
    pub forwarded: HeaderValue,
    pub baggage: HeaderValue,
}

impl ConnectHeaders {
    /// For a connection from `source` (the app's address: pod IP and its port), to the
    /// Service `host` when one was dialled, by the workload whose [`baggage`] it is.
    pub fn new(source: SocketAddr, host: Option<&str>, baggage: HeaderValue) -> Self {
        let forwarded = match host {
            Some(h) => format!("for=\"{source}\";host={h}"),
            None => format!("for=\"{source}\""),
        };
        ConnectHeaders { forwarded: header_value(&forwarded), baggage }
    }
}

/// The `baggage` of the workload `meta` (pod `pod`) in `cluster`: the same for every
/// connection of the pod, so made once, when it is enrolled.
pub fn baggage(meta: &WorkloadMeta, pod: &str, cluster: &str) -> HeaderValue {
    let kind = if meta.workload == pod { "pod" } else { "deployment" };
    header_value(&format!(
        "k8s.cluster.name={cluster},k8s.namespace.name={},k8s.{kind}.name={},service.name={},service.version={}",
        meta.namespace, meta.workload, meta.canonical_service, meta.canonical_revision
    ))
}

/// Names and labels are header-safe (DNS labels, label values); anything else is left out
/// rather than failing the connection.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static(""))
}

/// A new W3C `traceparent`: version 00, a random trace id and parent id, not sampled.
pub fn traceparent() -> HeaderValue {
    let random = || std::collections::hash_map::RandomState::new().build_hasher().finish();
    header_value(&format!("00-{:016x}{:016x}-{:016x}-00", random(), random(), random() | 1))
}

/// What the server reads from a CONNECT's headers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// The client app's address (`forwarded`'s `for`, when it has a port).
    pub client: Option<SocketAddr>,
    /// The Service the client dialled (`forwarded`'s `host`).
    pub host: Option<String>,
    /// The source workload, as its agent describes it (`baggage`).
    pub source: Option<Arc<WorkloadMeta>>,
    pub traceparent: Option<String>,
}

impl ConnectInfo {
    pub fn read(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let forwarded = |key| text(FORWARDED).and_then(|v| forwarded_param(v, key));
        ConnectInfo {
            client: forwarded("for").and_then(|f| f.parse().ok()),
            host: forwarded("host").map(str::to_owned),
            source: text(BAGGAGE).and_then(baggage_meta).map(Arc::new),
            traceparent: text(TRACEPARENT).filter(|t| t.len() == 55).map(str::to_owned),
        }
    }
}

/// Parameter `key` of the first `forwarded` element, unquoted; None when absent or empty.
fn forwarded_param<'v>(value: &'v str, key: &str) -> Option<&'v str> {
    value.split(',').next()?.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case(key).then(|| v.trim().trim_matches('"')).filter(|v| !v.is_empty())
    })
}

/// A workload from `baggage`: needs its namespace and workload name; the canonical service
/// and revision default as for a workload without labels.
fn baggage_meta(value: &str) -> Option<WorkloadMeta> {
    let (mut ns, mut workload, mut service, mut revision, mut cluster) = (None, None, None, None, None);
    for item in value.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else { continue };
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        match k.trim() {
            "k8s.cluster.name" => cluster = Some(v),
            "k8s.namespace.name" => ns = Some(v),
            "service.name" => service = Some(v),
            "service.version" => revision = Some(v),
            key if key.starts_with("k8s.") && key.ends_with(".name") => workload = Some(v),
            _ => {}
        }
    }
    let (ns, workload) = (ns?, workload?);
    let mut meta = WorkloadMeta::of(workload, ns, &Default::default());
    if let Some(s) = service {
        meta.canonical_service = s.to_owned();
    }
    if let Some(r) = revision {
        meta.canonical_revision = r.to_owned();
    }
    meta.cluster = cluster.map(str::to_owned);
    Some(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_connect_carries_reads_back_on_the_other_side() {
        let labels = [("app".to_string(), "web".to_string()), ("version".to_string(), "v1".to_string())].into();
        let meta = WorkloadMeta::of("web-deploy", "shop", &labels);
        let h = ConnectHeaders::new(
            "198.18.1.10:40123".parse().unwrap(),
            Some("db.shop.svc.cluster.local"),
            baggage(&meta, "web-deploy-7f9-x2", "c1"),
        );
        assert_eq!(h.forwarded, r#"for="198.18.1.10:40123";host=db.shop.svc.cluster.local"#);
        assert_eq!(
            h.baggage,
            "k8s.cluster.name=c1,k8s.namespace.name=shop,k8s.deployment.name=web-deploy,service.name=web,service.version=v1"
        );
        let v6 = ConnectHeaders::new("[2001:db8::1]:80".parse().unwrap(), None, baggage(&meta, "x", "c1"));
        assert_eq!(v6.forwarded, r#"for="[2001:db8::1]:80""#);

        let mut headers = HeaderMap::new();
        headers.insert(FORWARDED, h.forwarded.clone());
        headers.insert(BAGGAGE, h.baggage.clone());
        headers.insert(TRACEPARENT, traceparent());
        let info = ConnectInfo::read(&headers);
        assert_eq!(info.client, Some("198.18.1.10:40123".parse().unwrap()));
        assert_eq!(info.host.as_deref(), Some("db.shop.svc.cluster.local"));
        let source = info.source.unwrap();
        assert_eq!(
            (source.workload.as_str(), source.namespace.as_str(), source.canonical_service.as_str()),
            ("web-deploy", "shop", "web")
        );
        assert_eq!((source.canonical_revision.as_str(), source.cluster.as_deref()), ("v1", Some("c1")));
        let tp = info.traceparent.unwrap();
        assert!(tp.starts_with("00-") && tp.ends_with("-00") && tp.len() == 55, "{tp}");
        assert_ne!(traceparent(), traceparent(), "a new trace for each stream");
    }

    #[test]
    fn partial_or_foreign_headers_give_what_they_can() {
        let mut headers = HeaderMap::new();
        headers.insert(BAGGAGE, HeaderValue::from_static("k8s.namespace.name=shop"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=198.18.1.10"));
        let info = ConnectInfo::read(&headers);
        assert_eq!(info, ConnectInfo::default(), "no workload name, no host: nothing claimed");
        headers
            .insert(BAGGAGE, HeaderValue::from_static("k8s.namespace.name=shop,k8s.cronjob.name=backup,service.name="));
        headers.insert(FORWARDED, HeaderValue::from_static("For=\"198.18.1.10:1\";Host=\"db\", for=x;host=y"));
        let info = ConnectInfo::read(&headers);
        let source = info.source.unwrap();
        assert_eq!((source.workload.as_str(), source.canonical_service.as_str()), ("backup", "backup"));
        assert_eq!(source.canonical_revision, "latest");
        assert_eq!(info.host.as_deref(), Some("db"));
    }
}

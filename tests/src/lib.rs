//! The network-namespace lab: nodes and pods on one Linux machine, real eBPF, real agents.
//!
//! # Layout
//! * [`lab`]    — [`lab::Lab`]: nodes (netns + bridge), pods (netns + veth + cgroup v2),
//!   a fabric linking the nodes, cleanup on drop and of stale leftovers;
//! * [`agent`]  — one `selvedge run` per node: generated config, status, stop/restart;
//! * [`proc`]   — spawning processes inside a netns and cgroup;
//! * [`app`]    — running `selvedge-lab-app` in pods and parsing what it reports;
//! * [`probe`]  — an HBONE client presenting chosen (bad) certificates, for refusal tests;
//! * [`sys`]    — preflight checks and small helpers;
//! * [`seccomp`] — runs a process under a Kubernetes `Localhost` seccomp profile (the agent's);
//! * [`apiserver`] — a test Kubernetes API server (list/watch over HTTP) for the agent's k8s path;
//! * [`cluster`] — that API server, `--kube` agents and pods built by real CNI plugins.
//!
//! Addresses come from 198.18.0.0/15 only: pods of node *i* in 198.18.*i*.0/24, the fabric
//! between nodes in 198.19.0.0/24. Every name carries a per-lab prefix `svt-<pid>-<n>`.

pub mod agent;
pub mod apiserver;
pub mod app;
pub mod cluster;
pub mod lab;
pub mod probe;
pub mod proc;
pub mod seccomp;
pub mod sys;

pub use agent::{AgentOptions, Status};
pub use app::{Ask, Client, Transfer};
pub use lab::{Lab, LabService, Pod};

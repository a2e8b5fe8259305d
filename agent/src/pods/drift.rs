//! Drift between what the agent believes is enrolled and what the kernel holds, and pods
//! whose netns path now names another namespace: detected periodically, repaired, logged
//! and counted (`selvedge_reconcile_drift`).

use std::collections::BTreeSet;

use selvedge_common::POD_FLAG_STRICT;

use super::PodError;

impl super::Pods {
    /// Re-enroll every pod whose netns path now names another namespace than the one the
    /// agent holds (a sandbox recreated at the same path), or nothing: enrollment follows
    /// the namespace's identity, not its path. One `stat` per pod.
    pub async fn follow_netns_identity(&mut self) {
        let moved: Vec<(String, String)> = self
            .enrolled
            .iter()
            .filter_map(|(uid, p)| match p.ctx.netns.still_at_path() {
                Ok(true) => None,
                Ok(false) => Some((uid.clone(), "its netns path now names another namespace".to_owned())),
                Err(e) => Some((uid.clone(), format!("its netns path is gone ({e})"))),
            })
            .collect();
        for (uid, problem) in moved {
            let Some(spec) = self.enrolled.get(&uid).map(|p| p.spec.clone()) else { continue };
            self.mesh.metrics.drift(1);
            tracing::warn!(pod = %spec.name, namespace = %spec.namespace, netns = %spec.netns.display(), "drift: {problem}; enrolling it again");
            self.unenroll(&uid);
            self.try_enroll(&spec).await;
        }
    }

    /// Re-enroll pods whose kernel entry is missing or wrong; remove entries that belong to
    /// no pod (only while no pod is failing or waiting: their entries cannot be told apart
    /// from stale ones, and keeping them keeps those pods closed).
    pub async fn repair_drift(&mut self) {
        let kernel = self.datapath.enrolled();
        let broken: Vec<(String, String)> = self
            .enrolled
            .iter()
            .filter_map(|(uid, p)| {
                let want_flags = if p.spec.mtls.kernel_strict() { POD_FLAG_STRICT } else { 0 };
                let problem = match kernel.get(&p.ctx.netns.cookie()) {
                    None => "its kernel enrollment entry is missing".to_owned(),
                    Some(i) if i.pod_id != p.pod_id => {
                        format!("the kernel has it in slot {} (want {})", i.pod_id, p.pod_id)
                    }
                    Some(i) if i.flags & POD_FLAG_STRICT != want_flags => {
                        "its STRICT flag differs in the kernel".to_owned()
                    }
                    Some(_) => return None,
                };
                Some((uid.clone(), problem))
            })
            .collect();
        for (uid, problem) in broken {
            let Some(p) = self.enrolled.get(&uid) else { continue };
            let (spec, cookie, pod_id) = (p.spec.clone(), p.ctx.netns.cookie(), p.pod_id);
            self.mesh.metrics.drift(1);
            // Rewritten in place: the pod's listeners, slot and `sk_lookup` instance are
            // still the agent's, and un-enrolling first would leave its connections
            // uncaptured until the enrollment is made again (tens of milliseconds).
            match self.datapath.set_flags(cookie, pod_id, p.spec.mtls.kernel_strict()) {
                Ok(()) => {
                    tracing::warn!(pod = %spec.name, namespace = %spec.namespace, "drift: {problem}; entry rewritten");
                }
                Err(e) => {
                    tracing::warn!(pod = %spec.name, namespace = %spec.namespace, "drift: {problem}; rewriting it failed ({e}), enrolling it again");
                    self.unenroll(&uid);
                    self.try_enroll(&spec).await;
                }
            }
        }
        if let Err(e) = self.remove_orphans("drift: a kernel enrollment belongs to no pod; removing it") {
            tracing::error!("stale enrollment not removed: {e}");
        }
    }

    /// Remove kernel enrollments that belong to no enrolled pod, each logged with `why` and
    /// counted as drift. Does nothing while a pod is failing or waiting: its entry cannot be
    /// told apart from a stale one, and keeping it keeps that pod closed. Every orphan is
    /// tried; the first error is returned.
    pub fn remove_orphans(&mut self, why: &str) -> Result<(), PodError> {
        if !self.failed.is_empty() || !self.waiting.is_empty() {
            return Ok(());
        }
        let live: BTreeSet<u64> = self.enrolled.values().map(|p| p.ctx.netns.cookie()).collect();
        let mut first_error = None;
        for (cookie, info) in self.datapath.enrolled() {
            if !live.contains(&cookie) {
                tracing::warn!(netns_cookie = cookie, "{why}");
                self.mesh.metrics.drift(1);
                if let Err(e) = self.datapath.unenroll(cookie, info.pod_id) {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }
}

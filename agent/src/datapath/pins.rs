//! The pin directory: layout, atomic link replacement, and `selvedge uninstall`.

use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;

use super::DatapathError;

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Io { what, source }
}

/// Create `<pin>/maps` and `<pin>/links`; returns the maps directory.
pub(super) fn ensure_dirs(pin_dir: &Path) -> Result<PathBuf, DatapathError> {
    for sub in ["maps", "links"] {
        let d = pin_dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io_err(format!("create {}", d.display())))?;
    }
    Ok(pin_dir.join("maps"))
}

pub(super) fn pod_link_name(netns_cookie: u64) -> String {
    format!("pod-{netns_cookie}")
}

/// Pin `link` as `<pin>/links/<name>`, replacing an older link of that name without a gap:
/// the new link is attached and pinned first, then renamed over the old pin, whose link
/// detaches when that last reference goes.
pub(super) fn replace_link(pin_dir: &Path, name: &str, link: FdLink) -> Result<(), DatapathError> {
    let final_path = pin_dir.join("links").join(name);
    // bpffs refuses names containing '.', hence no dot-file for the temporary pin.
    let tmp = pin_dir.join("links").join(format!("new-{name}"));
    let _ = std::fs::remove_file(&tmp);
    link.pin(&tmp).map_err(|e| DatapathError::Io {
        what: format!("pin {}", tmp.display()),
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    std::fs::rename(&tmp, &final_path).map_err(io_err(format!(
        "rename {} over {}",
        tmp.display(),
        final_path.display()
    )))
}

/// Remove `<pin>/links/<name>` (detaching its link); absent is fine.
pub(super) fn remove_link(pin_dir: &Path, name: &str) -> Result<(), DatapathError> {
    let p = pin_dir.join("links").join(name);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatapathError::Io { what: format!("remove {}", p.display()), source: e }),
    }
}

/// Is anything pinned under `<pin>/links` or `<pin>/maps` (an earlier agent's state)?
pub(super) fn has_pins(pin_dir: &Path) -> bool {
    ["links", "maps"].iter().any(|sub| std::fs::read_dir(pin_dir.join(sub)).is_ok_and(|mut d| d.next().is_some()))
}

/// After a start that failed once something was pinned: with `fresh` (nothing was pinned
/// before), remove this agent's pins so the kernel is as it was found; otherwise the pins
/// are an earlier agent's and stay, on purpose (its pods stay closed rather than open).
/// Returns what was done, for the error the operator sees.
pub(super) fn after_failed_start(pin_dir: &Path, fresh: bool, link_names: &[&str]) -> String {
    let dir = pin_dir.display();
    if !fresh {
        return format!(
            "the pins under {dir} predate this start (an earlier agent's) and stay, so the pods it enrolled \
             stay closed until an agent runs again; `selvedge uninstall --pin-dir {dir}` removes them"
        );
    }
    match uninstall(pin_dir, link_names) {
        Ok(done) if done.kept.is_empty() => {
            format!(
                "removed the {} pins this start made under {dir}: nothing of Selvedge's is left attached",
                done.removed
            )
        }
        Ok(done) => format!(
            "removed the {} pins this start made under {dir}; left in place (not Selvedge's): {:?}",
            done.removed, done.kept
        ),
        Err(e) => format!(
            "removing the pins this start made under {dir} failed ({e}): run `selvedge uninstall --pin-dir {dir}`"
        ),
    }
}

/// What `selvedge uninstall` did.
#[derive(Debug, Default)]
pub struct Uninstalled {
    /// Pins removed.
    pub removed: usize,
    /// Entries left in place because they are not pins of Selvedge's (nothing of anyone
    /// else's is removed).
    pub kept: Vec<PathBuf>,
}

/// Is `name`, under `<pin>/<sub>`, a pin this agent makes? Maps are pinned by their
/// `SV_*` names; links by program name (`links`), `pod-<cookie>`, or the temporary
/// `new-<name>` of a replacement that was interrupted.
fn is_ours(sub: &str, name: &str, link_names: &[&str]) -> bool {
    match sub {
        "maps" => name.starts_with("SV_"),
        _ => {
            let name = name.strip_prefix("new-").unwrap_or(name);
            link_names.contains(&name)
                || name.strip_prefix("pod-").is_some_and(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        }
    }
}

/// Remove Selvedge's pins under `pin_dir`: links first (capture stops), then maps, then
/// the directories if nothing else is left in them. Refuses a directory that is not on a
/// bpf filesystem (only bpffs holds pins; anything else there is someone's files), and
/// leaves alone every entry that is not one of its own pins.
pub fn uninstall(pin_dir: &Path, link_names: &[&str]) -> Result<Uninstalled, DatapathError> {
    let mut done = Uninstalled::default();
    match std::fs::symlink_metadata(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(DatapathError::Io { what: format!("inspect {}", pin_dir.display()), source: e }),
        Ok(m) if !m.is_dir() => return Err(DatapathError::NotAPinDir { dir: pin_dir.to_owned() }),
        Ok(_) => {}
    }
    if !crate::sys::is_bpffs(pin_dir) {
        return Err(DatapathError::NotAPinDir { dir: pin_dir.to_owned() });
    }
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() || !crate::sys::is_bpffs(&dir) {
            done.kept.push(dir);
            continue;
        }
        let entries = std::fs::read_dir(&dir).map_err(io_err(format!("list {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
            let ours = entry.file_name().to_str().is_some_and(|n| is_ours(sub, n, link_names))
                && entry.file_type().is_ok_and(|t| t.is_file());
            if !ours {
                done.kept.push(entry.path());
                continue;
            }
            std::fs::remove_file(entry.path()).map_err(io_err(format!("remove {}", entry.path().display())))?;
            done.removed += 1;
        }
        remove_dir_if_empty(&dir)?;
    }
    remove_dir_if_empty(pin_dir)?;
    Ok(done)
}

/// Remove `dir` unless something is left in it (or it is gone already).
fn remove_dir_if_empty(dir: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty) => Ok(()),
        Err(e) => Err(DatapathError::Io { what: format!("remove {}", dir.display()), source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::{is_ours, uninstall};

    const LINKS: [&str; 2] = ["capture_connect4", "track_captured"];

    #[test]
    fn only_selvedges_own_pin_names_count_as_its_own() {
        assert!(is_ours("maps", "SV_ENROLLED", &LINKS));
        assert!(!is_ours("maps", "notes", &LINKS));
        assert!(is_ours("links", "capture_connect4", &LINKS));
        assert!(is_ours("links", "new-track_captured", &LINKS));
        assert!(is_ours("links", "pod-4096", &LINKS));
        assert!(!is_ours("links", "pod-", &LINKS));
        assert!(!is_ours("links", "pod-12x", &LINKS));
        assert!(!is_ours("links", "cilium_link", &LINKS));
    }

    #[test]
    fn uninstall_refuses_a_directory_that_is_not_bpffs_and_deletes_nothing() {
        let dir = std::env::temp_dir().join(format!("selvedge-uninstall-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("maps")).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        std::fs::write(dir.join("maps").join("SV_ENROLLED"), "looks like a pin").unwrap();
        let err = uninstall(&dir, &LINKS).expect_err("not a bpf filesystem");
        assert!(err.to_string().contains("not on a bpf filesystem"), "{err}");
        assert!(dir.join("notes.txt").exists() && dir.join("maps").join("SV_ENROLLED").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(uninstall(&dir, &LINKS).unwrap().removed, 0, "an absent directory: nothing to do");
    }
}

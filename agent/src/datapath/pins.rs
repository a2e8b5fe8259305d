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

/// Remove every pin under `pin_dir`: links first (capture stops), then maps.
/// Returns how many pins were removed.
pub fn uninstall(pin_dir: &Path) -> Result<usize, DatapathError> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
            std::fs::remove_file(entry.path()).map_err(io_err(format!("remove {}", entry.path().display())))?;
            removed += 1;
        }
        std::fs::remove_dir(&dir).map_err(io_err(format!("remove {}", dir.display())))?;
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DatapathError::Io { what: format!("remove {}", pin_dir.display()), source: e }),
    }
    Ok(removed)
}

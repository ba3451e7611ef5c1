//! Paths confined to the workspace: every path a tool is given is resolved against the
//! workspace root and refused unless it stays inside it, with symlinks resolved
//! (`canonicalize` of the longest part that exists, then a prefix check), so `../x`, an
//! absolute path elsewhere and a symlink pointing out are all refused.

use std::path::{Component, Path, PathBuf};

/// `raw` (relative to `root`, or absolute) as a path inside `root`, which must be canonical.
/// The path need not exist (a file about to be written); the part of it that exists is
/// resolved with its symlinks, and what follows must be plain names.
pub fn resolve(root: &Path, raw: &str) -> Result<PathBuf, String> {
    if raw.trim().is_empty() {
        return Err("the path is empty".into());
    }
    let given = Path::new(raw);
    let joined = if given.is_absolute() {
        given.to_path_buf()
    } else {
        root.join(given)
    };
    // Split into the longest prefix that exists (a dangling symlink counts: it is refused
    // below) and the names after it.
    let mut existing = joined.as_path();
    let mut rest: Vec<&std::ffi::OsStr> = vec![];
    while existing.symlink_metadata().is_err() {
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(Component::Normal(name))) => {
                rest.push(name);
                existing = parent;
            }
            _ => return Err(format!("{raw} is outside the workspace")),
        }
    }
    let canonical = existing.canonicalize().map_err(|_| {
        format!(
            "{raw} is a symlink to a missing target ({})",
            existing.display()
        )
    })?;
    if !canonical.starts_with(root) {
        return Err(format!("{raw} is outside the workspace"));
    }
    let mut out = canonical;
    for name in rest.iter().rev() {
        out.push(name);
    }
    Ok(out)
}

/// `path` (inside `root`) as the model should see it: relative, `.` for the root.
pub fn shown(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".into(),
        Ok(rel) => rel.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::write(root.join("src/lib.rs"), "x").unwrap();
        (dir, root)
    }

    #[test]
    fn paths_inside_resolve_whether_or_not_they_exist() {
        let (_d, root) = root();
        assert_eq!(
            resolve(&root, "src/lib.rs").unwrap(),
            root.join("src/lib.rs")
        );
        assert_eq!(
            resolve(&root, "./src/lib.rs").unwrap(),
            root.join("src/lib.rs")
        );
        assert_eq!(
            resolve(&root, "src/../src/lib.rs").unwrap(),
            root.join("src/lib.rs")
        );
        assert_eq!(
            resolve(&root, "new/dir/a.txt").unwrap(),
            root.join("new/dir/a.txt")
        );
        let abs = root.join("src/lib.rs");
        assert_eq!(resolve(&root, abs.to_str().unwrap()).unwrap(), abs);
        assert_eq!(resolve(&root, ".").unwrap(), root);
        assert_eq!(shown(&root, &root.join("src/lib.rs")), "src/lib.rs");
        assert_eq!(shown(&root, &root), ".");
    }

    #[test]
    fn escapes_are_refused() {
        let (_d, root) = root();
        for bad in ["../x", "src/../../x", "/etc/passwd", "nope/../../x", ""] {
            assert!(resolve(&root, bad).is_err(), "{bad} was accepted");
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("s")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
        for bad in ["out/secret", "out/new.txt", "s", "dangling"] {
            let e = resolve(&root, bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        // A symlink that stays inside is fine.
        std::os::unix::fs::symlink(root.join("src"), root.join("alias")).unwrap();
        assert_eq!(
            resolve(&root, "alias/lib.rs").unwrap(),
            root.join("src/lib.rs")
        );
    }
}

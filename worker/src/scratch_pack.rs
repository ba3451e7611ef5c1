//! A scratch workspace's checkpoint made by the worker itself, without a git process: the
//! directory's files as git objects (blobs, trees and a root commit, hashed as git hashes
//! them), packed into a git bundle (v2) whose one ref, [`REF`], names the commit. What
//! `git add -A -f`, `write-tree`, `commit-tree` and `bundle create` made before, for a
//! directory that starts empty and holds what the agent wrote: each of those was a process
//! started under the supervisor (three `exec`s each), ten per checkpoint, the largest part
//! of a native agent's CPU on a busy worker. The bundle is read back by `git fetch` when a
//! run resumes, as before.
//!
//! What is saved is what `git add -A -f` saves: regular files (executable or not) and
//! symbolic links, anywhere under the directory, ignore rules not applied; `.git` (the
//! directory restores use) and empty directories are left out, as git leaves them.

use sha1_smol::Sha1;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The ref the bundle names its commit under (what restores fetch).
pub const REF: &str = "refs/orch/checkpoint";

/// git's empty tree.
pub const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// A scratch directory read as git objects.
#[derive(Debug)]
pub struct Scanned {
    /// The root tree's id.
    pub tree: String,
    /// Files and symbolic links in it (what a diff against the empty tree lists).
    pub files: u32,
    /// The pack's objects so far, compressed, with their count; `None` once the pack grew
    /// past the bound given to [`scan`] (the tree id is still right).
    objects: Option<(Vec<u8>, u32)>,
    /// Ids of the objects in the pack (a file's content twice is packed once).
    seen: HashSet<[u8; 20]>,
    bound: usize,
}

impl Scanned {
    /// The bundle of the tree as the root commit whose content is `commit_body` (a commit
    /// object's text naming [`Scanned::tree`]): the commit's id and the bundle's bytes.
    /// `None` when the pack grew past the bound.
    pub fn bundle(mut self, commit_body: &[u8]) -> Option<(String, Vec<u8>)> {
        let commit = self.add(ObjectKind::Commit, commit_body);
        let (objects, count) = self.objects?;
        let mut out = format!("# v2 git bundle\n{} {REF}\n\n", hex(&commit)).into_bytes();
        let start = out.len();
        out.extend_from_slice(b"PACK");
        out.extend_from_slice(&2u32.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&objects);
        let mut sum = Sha1::new();
        sum.update(&out[start..]);
        out.extend_from_slice(&sum.digest().bytes());
        Some((hex(&commit), out))
    }

    /// Hashes an object and, unless it is in the pack already (or the pack is over its
    /// bound), appends it compressed. Its id.
    fn add(&mut self, kind: ObjectKind, content: &[u8]) -> [u8; 20] {
        let id = object_id(kind, content);
        if self.seen.insert(id)
            && let Some((pack, count)) = &mut self.objects
        {
            pack_object(pack, kind, content);
            *count += 1;
            if pack.len() > self.bound {
                self.objects = None;
            }
        }
        id
    }
}

#[derive(Clone, Copy)]
enum ObjectKind {
    Commit,
    Tree,
    Blob,
}

impl ObjectKind {
    fn name(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Tree => "tree",
            Self::Blob => "blob",
        }
    }

    /// The type number of a pack entry.
    fn pack_type(self) -> u8 {
        match self {
            Self::Commit => 1,
            Self::Tree => 2,
            Self::Blob => 3,
        }
    }
}

/// An object's id as git computes it: the SHA-1 of `<kind> <size>\0<content>`.
fn object_id(kind: ObjectKind, content: &[u8]) -> [u8; 20] {
    let mut h = Sha1::new();
    h.update(format!("{} {}\0", kind.name(), content.len()).as_bytes());
    h.update(content);
    h.digest().bytes()
}

/// Appends an undeltified pack entry: the type and size header, then the zlib stream.
fn pack_object(pack: &mut Vec<u8>, kind: ObjectKind, content: &[u8]) {
    let mut size = content.len();
    let mut byte = (kind.pack_type() << 4) | (size & 0x0f) as u8;
    size >>= 4;
    while size > 0 {
        pack.push(byte | 0x80);
        byte = (size & 0x7f) as u8;
        size >>= 7;
    }
    pack.push(byte);
    let mut z = flate2::write::ZlibEncoder::new(pack, flate2::Compression::fast());
    // Writing into a Vec does not fail.
    let _ = z.write_all(content);
    let _ = z.finish();
}

fn hex(id: &[u8; 20]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads scratch directory `dir` as git objects, packing them until the pack passes `bound`
/// bytes. Blocking: run it off the async threads.
pub fn scan(dir: &Path, bound: usize) -> std::io::Result<Scanned> {
    let mut s = Scanned {
        tree: String::new(),
        files: 0,
        objects: Some((Vec::new(), 0)),
        seen: HashSet::new(),
        bound,
    };
    let root = tree(dir, &mut s)?;
    s.tree = root.map_or_else(|| EMPTY_TREE.to_string(), |id| hex(&id));
    Ok(s)
}

/// The tree object of `dir` (added to the pack with everything under it); `None` for a
/// directory with no file under it (git keeps no empty tree inside another).
fn tree(dir: &Path, s: &mut Scanned) -> std::io::Result<Option<[u8; 20]>> {
    // git orders a tree's entries by name, a directory's name compared as if it ended in '/'.
    let mut entries: Vec<(Vec<u8>, std::fs::DirEntry, std::fs::FileType)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        let kind = entry.file_type()?;
        let mut key = name.as_bytes().to_vec();
        if kind.is_dir() {
            key.push(b'/');
        }
        entries.push((key, entry, kind));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut body = Vec::new();
    for (_, entry, kind) in entries {
        let path = entry.path();
        let (mode, id) = if kind.is_symlink() {
            let target = std::fs::read_link(&path)?;
            s.files += 1;
            let t = target.as_os_str().as_bytes();
            ("120000", s.add(ObjectKind::Blob, t))
        } else if kind.is_file() {
            let mut content = Vec::new();
            std::fs::File::open(&path)?.read_to_end(&mut content)?;
            let executable = entry.metadata()?.permissions().mode() & 0o100 != 0;
            s.files += 1;
            let mode = if executable { "100755" } else { "100644" };
            (mode, s.add(ObjectKind::Blob, &content))
        } else if kind.is_dir() {
            match tree(&path, s)? {
                Some(id) => ("40000", id),
                None => continue,
            }
        } else {
            // Sockets, pipes, devices: git adds none of them.
            continue;
        };
        body.extend_from_slice(mode.as_bytes());
        body.push(b' ');
        body.extend_from_slice(entry.file_name().as_bytes());
        body.push(0);
        body.extend_from_slice(&id);
    }
    if body.is_empty() {
        return Ok(None);
    }
    Ok(Some(s.add(ObjectKind::Tree, &body)))
}

#[cfg(test)]
mod tests {
    //! Against real git: the tree id is the one `git add -A -f` and `write-tree` give for the
    //! same directory, and `git fetch` of the bundle brings back every file.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn body(tree: &str) -> Vec<u8> {
        let who = "orchestrator <orchestrator@localhost> 1800000000 +0000";
        format!("tree {tree}\nauthor {who}\ncommitter {who}\n\ncheckpoint\n").into_bytes()
    }

    #[test]
    fn a_scratch_tree_bundled_in_process_is_what_git_makes_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("scratch");
        std::fs::create_dir_all(dir.join("src/deep/er")).unwrap();
        std::fs::create_dir_all(dir.join("empty/inside")).unwrap();
        std::fs::write(dir.join("README.md"), "# hello\n").unwrap();
        std::fs::write(dir.join("src/main.rs"), "fn main() {}\n").unwrap();
        // The same content twice is one object; names that sort differently as directories.
        std::fs::write(dir.join("src/deep/er/copy.rs"), "fn main() {}\n").unwrap();
        std::fs::write(dir.join("src.txt"), "x".repeat(100_000)).unwrap();
        std::fs::write(dir.join("src-a"), "").unwrap();
        std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        let mut p = std::fs::metadata(dir.join("run.sh")).unwrap().permissions();
        p.set_mode(0o755);
        std::fs::set_permissions(dir.join("run.sh"), p).unwrap();
        std::os::unix::fs::symlink("src/main.rs", dir.join("link")).unwrap();
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        std::fs::write(dir.join(".git/not-saved"), "x").unwrap();

        let scanned = scan(&dir, 1 << 20).unwrap();
        assert_eq!(scanned.files, 7);
        let tree = scanned.tree.clone();
        let (commit, bundle) = scanned.bundle(&body(&tree)).unwrap();

        // git's own tree of the same files (a copy without the fake `.git`).
        let copy = tmp.path().join("copy");
        std::fs::create_dir_all(&copy).unwrap();
        let status = Command::new("cp")
            .args(["-a", "--"])
            .arg(dir.join("."))
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::remove_dir_all(copy.join(".git")).unwrap();
        git(&copy, &["init", "-q"]);
        git(&copy, &["add", "-A", "-f"]);
        assert_eq!(tree, git(&copy, &["write-tree"]));

        // Fetched into a fresh repository, the bundle's commit has every file back.
        let restore = tmp.path().join("restore");
        std::fs::create_dir_all(&restore).unwrap();
        git(&restore, &["init", "-q"]);
        let file = tmp.path().join("b.bundle");
        std::fs::write(&file, &bundle).unwrap();
        git(
            &restore,
            &["bundle", "verify", "-q", file.to_str().unwrap()],
        );
        git(
            &restore,
            &[
                "fetch",
                "-q",
                file.to_str().unwrap(),
                &format!("+{REF}:refs/x"),
            ],
        );
        assert_eq!(git(&restore, &["rev-parse", "refs/x"]), commit);
        git(&restore, &["fsck", "--no-progress", "--strict"]);
        git(&restore, &["checkout", "-q", &commit]);
        for f in [
            "README.md",
            "src/main.rs",
            "src/deep/er/copy.rs",
            "src.txt",
            "run.sh",
        ] {
            assert_eq!(
                std::fs::read(restore.join(f)).unwrap(),
                std::fs::read(dir.join(f)).unwrap(),
                "{f}"
            );
        }
        let mode = std::fs::metadata(restore.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_ne!(mode & 0o100, 0, "run.sh lost its executable bit");
        assert_eq!(
            std::fs::read_link(restore.join("link")).unwrap(),
            Path::new("src/main.rs")
        );
        assert!(!restore.join("not-saved").exists());
    }

    #[test]
    fn an_empty_directory_is_the_empty_tree_and_a_pack_past_its_bound_is_no_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        let scanned = scan(tmp.path(), 1 << 20).unwrap();
        assert_eq!((scanned.tree.as_str(), scanned.files), (EMPTY_TREE, 0));
        assert!(scanned.bundle(&body(EMPTY_TREE)).is_some());

        // Random-looking bytes do not compress: 64 KiB of them pass a 16 KiB bound.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..65_536)
            .map(|_| {
                // xorshift64
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect();
        std::fs::write(tmp.path().join("noise"), noise).unwrap();
        let scanned = scan(tmp.path(), 16 * 1024).unwrap();
        assert_ne!(scanned.tree, EMPTY_TREE);
        let tree = scanned.tree.clone();
        assert!(scanned.bundle(&body(&tree)).is_none());
    }
}

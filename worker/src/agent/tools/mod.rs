//! The native tools of the chat backends' tool loop ([`super::tool_loop`]): read, write and
//! edit a file, list files, search file contents, run a shell command. Every path is confined
//! to the job's workspace ([`path`]); every result is capped in size and says so when cut
//! ("[truncated: 12,345 more bytes]"). A failing call (a bad argument, a refused path, a tool
//! the role may not use) is an error result for the model to read, never a failed job.
//!
//! Which tools a role gets comes from the one role table ([`crate::roles::NATIVE_TOOLS`]).
//!
//! Layout: [`path`] confines paths; [`shell`] runs commands; the file tools are here.
//!
//! The result cap and the `bash` timeouts are worker settings ([`Limits`], from
//! `[agent]`); the counts below are fixed.

pub mod mcp;
pub mod mcp_http;
pub mod path;
pub mod shell;

use crate::sandbox::Jail;
use grep_regex::RegexMatcherBuilder;
use grep_searcher::{BinaryDetection, SearcherBuilder, sinks};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How big a tool result may be and how long a command may run (the worker's `[agent]`
/// settings, with the role's `bash_timeout`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The most a tool result holds, in bytes.
    pub max_result_bytes: usize,
    /// A command's timeout when the model gives none.
    pub bash_timeout: Duration,
    /// The longest timeout a command may ask for.
    pub bash_max_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_result_bytes: 30_000,
            bash_timeout: Duration::from_secs(120),
            bash_max_timeout: Duration::from_secs(600),
        }
    }
}
/// Lines `read_file` returns when not told how many.
const DEFAULT_READ_LINES: usize = 2_000;
/// Files `list_files` names at most.
const MAX_LISTED: usize = 1_000;
/// Matching lines `search` returns at most.
const MAX_MATCHES: usize = 500;

/// Tools that only read: several calls of these in one response run concurrently.
pub const READ_ONLY: &[&str] = &["read_file", "list_files", "search"];

/// A tool's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub text: String,
    pub is_error: bool,
}

impl ToolOutput {
    pub fn ok(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            is_error: false,
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            is_error: true,
        }
    }
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub input: Value,
}

/// A tool's name, description and JSON schema, as both APIs take them.
pub struct Spec {
    pub name: String,
    pub description: String,
    pub schema: Value,
}

/// The specs of `names` (unknown names are skipped).
pub fn specs(names: &[&'static str]) -> Vec<Spec> {
    names.iter().filter_map(|n| spec(n)).collect()
}

fn spec(name: &'static str) -> Option<Spec> {
    let (description, schema) = match name {
        "read_file" => (
            "Read a text file of the workspace. Lines are numbered from 1; give offset (first line) and limit (number of lines) for part of a long file.",
            json!({"type": "object", "properties": {
                "path": {"type": "string", "description": "path relative to the workspace"},
                "offset": {"type": "integer", "minimum": 1},
                "limit": {"type": "integer", "minimum": 1}},
                "required": ["path"]}),
        ),
        "write_file" => (
            "Create or overwrite a file of the workspace with the given content (parent directories are created).",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"}},
                "required": ["path", "content"]}),
        ),
        "edit_file" => (
            "Replace an exact string in a file. old_string must occur exactly once unless replace_all is true; include enough surrounding text to make it unique.",
            json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "old_string": {"type": "string"},
                "new_string": {"type": "string"},
                "replace_all": {"type": "boolean"}},
                "required": ["path", "old_string", "new_string"]}),
        ),
        "list_files" => (
            "List the files of the workspace matching a glob (default **/*), under an optional directory; .gitignore is respected.",
            json!({"type": "object", "properties": {
                "pattern": {"type": "string", "description": "glob such as **/*.rs"},
                "path": {"type": "string", "description": "directory to list (default: the workspace)"}}}),
        ),
        "search" => (
            "Search file contents with a regular expression; answers path:line:text for each matching line.",
            json!({"type": "object", "properties": {
                "pattern": {"type": "string"},
                "path": {"type": "string", "description": "file or directory (default: the workspace)"},
                "glob": {"type": "string", "description": "only files matching this glob"},
                "case_insensitive": {"type": "boolean"}},
                "required": ["pattern"]}),
        ),
        "bash" => (
            "Run a shell command (bash) in the workspace directory. Output (stdout and stderr together) is capped; the command is killed after timeout_secs (the default and the most allowed are set by the worker).",
            json!({"type": "object", "properties": {
                "command": {"type": "string"},
                "timeout_secs": {"type": "integer", "minimum": 1}},
                "required": ["command"]}),
        ),
        _ => return None,
    };
    Some(Spec {
        name: name.into(),
        description: description.into(),
        schema,
    })
}

/// The tools of one job: its workspace and what its role may use.
pub struct Toolbox {
    /// The workspace, canonical; `None` when the job has no tools.
    root: Option<PathBuf>,
    allowed: Vec<&'static str>,
    role: String,
    /// The job's sandbox, where `bash` runs (`None`: the sandbox is off).
    jail: Option<Arc<Jail>>,
    limits: Limits,
    /// The job's MCP servers.
    mcp: Option<Arc<mcp::McpTools>>,
}

impl Toolbox {
    /// `allowed` tools in `root` (made canonical here), for `role` (named in refusals).
    pub fn new(
        root: &Path,
        allowed: Vec<&'static str>,
        role: &str,
        limits: Limits,
    ) -> Result<Self, String> {
        let root = root
            .canonicalize()
            .map_err(|e| format!("the workspace {} is not usable: {e}", root.display()))?;
        Ok(Self {
            root: Some(root),
            allowed,
            role: role.into(),
            jail: None,
            limits,
            mcp: None,
        })
    }

    /// Runs `bash` in `jail`.
    pub fn with_jail(mut self, jail: Option<Arc<Jail>>) -> Self {
        self.jail = jail;
        self
    }

    /// The sandbox its commands run in.
    pub fn jail(&self) -> Option<&Jail> {
        self.jail.as_deref()
    }

    /// Offers the tools of `mcp` too.
    pub fn with_mcp(mut self, mcp: mcp::McpTools) -> Self {
        self.mcp = Some(Arc::new(mcp));
        self
    }

    /// The specs of every tool offered: the allowed native ones, then the MCP ones.
    pub fn specs(&self) -> Vec<Spec> {
        let mut all = specs(&self.allowed);
        if let Some(m) = &self.mcp {
            all.extend(m.specs());
        }
        all
    }

    /// Whether the model may call `name`: an allowed native tool or an offered MCP tool.
    pub fn offers(&self, name: &str) -> bool {
        self.allowed.contains(&name) || self.mcp.as_ref().is_some_and(|m| m.offers(name))
    }

    /// Whether any tool is offered.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty() && self.mcp.as_ref().is_none_or(|m| m.specs().is_empty())
    }

    /// No workspace and no tools: every call is refused.
    pub fn none(role: &str) -> Self {
        Self {
            root: None,
            allowed: vec![],
            role: role.into(),
            jail: None,
            limits: Limits::default(),
            mcp: None,
        }
    }

    pub fn allowed(&self) -> &[&'static str] {
        &self.allowed
    }

    /// Runs one call; a refusal or failure is an error output. `cancel` stops a shell command.
    pub async fn run(&self, call: &Call, cancel: &CancellationToken) -> ToolOutput {
        if let Some(m) = self.mcp.as_ref().filter(|m| m.offers(&call.name)) {
            let max = self.limits.max_result_bytes;
            return m
                .call(
                    &call.name,
                    &call.input,
                    max,
                    self.limits.bash_max_timeout,
                    cancel,
                )
                .await;
        }
        let Some(root) = self.root.clone() else {
            return ToolOutput::error(format!(
                "no tools are available in this job; `{}` was not run",
                call.name
            ));
        };
        if !self.allowed.contains(&call.name.as_str()) {
            return ToolOutput::error(format!(
                "tool `{}` is not allowed for the {} role (allowed: {})",
                call.name,
                self.role,
                self.allowed.join(", ")
            ));
        }
        let input = call.input.clone();
        if call.name == "bash" {
            let Some(command) = input.get("command").and_then(Value::as_str) else {
                return ToolOutput::error("bash: missing string field `command`");
            };
            let timeout = input
                .get("timeout_secs")
                .and_then(Value::as_u64)
                .map_or(self.limits.bash_timeout, Duration::from_secs)
                .min(self.limits.bash_max_timeout);
            let max = self.limits.max_result_bytes;
            return shell::run(&root, command, timeout, max, cancel, self.jail.as_deref()).await;
        }
        let name = call.name.clone();
        let max = self.limits.max_result_bytes;
        let run = tokio::task::spawn_blocking(move || file_tool(&root, &name, &input, max));
        match run.await {
            Ok(Ok(text)) => ToolOutput::ok(text),
            Ok(Err(e)) => ToolOutput::error(e),
            Err(e) => ToolOutput::error(format!("{} failed: {e}", call.name)),
        }
    }
}

fn str_field<'a>(tool: &str, input: &'a Value, key: &str) -> Result<&'a str, String> {
    input
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{tool}: missing string field `{key}`"))
}

fn file_tool(root: &Path, name: &str, input: &Value, max: usize) -> Result<String, String> {
    let at = |key: &str, default: Option<&str>| -> Result<PathBuf, String> {
        let raw = match (input.get(key).and_then(Value::as_str), default) {
            (Some(p), _) => p,
            (None, Some(d)) => d,
            (None, None) => return Err(format!("{name}: missing string field `{key}`")),
        };
        path::resolve(root, raw).map_err(|e| format!("{name}: {e}"))
    };
    match name {
        "read_file" => {
            let file = at("path", None)?;
            let offset = input.get("offset").and_then(Value::as_u64).unwrap_or(1) as usize;
            let limit = input
                .get("limit")
                .and_then(Value::as_u64)
                .map_or(DEFAULT_READ_LINES, |n| n as usize);
            read_file(root, &file, offset, limit, max)
        }
        "write_file" => {
            let file = at("path", None)?;
            let content = str_field(name, input, "content")?;
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("write_file: cannot create {}: {e}", parent.display()))?;
            }
            std::fs::write(&file, content)
                .map_err(|e| format!("write_file: {}: {e}", path::shown(root, &file)))?;
            Ok(format!(
                "wrote {} bytes to {}",
                content.len(),
                path::shown(root, &file)
            ))
        }
        "edit_file" => {
            let file = at("path", None)?;
            let old = str_field(name, input, "old_string")?;
            let new = str_field(name, input, "new_string")?;
            let all = input
                .get("replace_all")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let shown = path::shown(root, &file);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("edit_file: cannot read {shown}: {e}"))?;
            let (edited, n) =
                edit(&text, old, new, all).map_err(|e| format!("edit_file: {e} in {shown}"))?;
            std::fs::write(&file, edited).map_err(|e| format!("edit_file: {shown}: {e}"))?;
            Ok(format!("replaced {n} occurrence(s) in {shown}"))
        }
        "list_files" => {
            let dir = at("path", Some("."))?;
            let pattern = input
                .get("pattern")
                .and_then(Value::as_str)
                .unwrap_or("**/*");
            list_files(root, &dir, pattern, max)
        }
        "search" => {
            let at_path = at("path", Some("."))?;
            let pattern = str_field(name, input, "pattern")?;
            let glob = input.get("glob").and_then(Value::as_str);
            let ci = input
                .get("case_insensitive")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            search(root, &at_path, pattern, glob, ci, max)
        }
        other => Err(format!("unknown tool `{other}`")),
    }
}

/// `text` with `old` replaced by `new`: exactly one occurrence, or all of them with `all`;
/// the new text and how many were replaced. A missing or (without `all`) ambiguous match is
/// refused.
pub fn edit(text: &str, old: &str, new: &str, all: bool) -> Result<(String, usize), String> {
    if old.is_empty() {
        return Err("old_string is empty".into());
    }
    let n = text.matches(old).count();
    match n {
        0 => Err("old_string was not found".into()),
        1 => Ok((text.replacen(old, new, 1), 1)),
        _ if all => Ok((text.replace(old, new), n)),
        _ => Err(format!(
            "old_string occurs {n} times; add surrounding text to make it unique, or set replace_all"
        )),
    }
}

/// `n` with thousands separators: 12,345.
fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `text` cut to `max` bytes (on a char boundary) with a note saying how much was cut.
pub fn cap(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[truncated: {} more bytes]",
        &text[..end],
        grouped(text.len() - end)
    )
}

/// Lines `offset..offset + limit` of `file`, numbered, read as a stream (a huge file costs
/// no memory): at most `max` bytes of them, with a note on what follows.
fn read_file(
    root: &Path,
    file: &Path,
    offset: usize,
    limit: usize,
    max: usize,
) -> Result<String, String> {
    use std::io::BufRead;
    let shown = path::shown(root, file);
    let opened =
        std::fs::File::open(file).map_err(|e| format!("read_file: cannot read {shown}: {e}"))?;
    let start = offset.max(1);
    let mut reader = std::io::BufReader::new(opened);
    let mut out = String::new();
    let (mut n, mut more_bytes) = (0usize, 0usize);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("read_file: cannot read {shown}: {e}"))?;
        if read == 0 {
            break;
        }
        if line.contains(&0) {
            return Err(format!("read_file: {shown} is a binary file"));
        }
        n += 1;
        if n < start || n >= start + limit {
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let numbered = format!("{n:>6}\t{}\n", text.trim_end_matches(['\n', '\r']));
        if out.len() + numbered.len() > max {
            more_bytes += numbered.len();
        } else {
            out.push_str(&numbered);
        }
    }
    if start > n.max(1) {
        return Err(format!(
            "read_file: {shown} has {n} lines; offset {start} is past its end"
        ));
    }
    if more_bytes > 0 {
        out.push_str(&format!(
            "[truncated: {} more bytes]\n",
            grouped(more_bytes)
        ));
    }
    let end = (start - 1 + limit).min(n);
    if end < n {
        out.push_str(&format!(
            "[{} more lines: read on with offset {}]\n",
            grouped(n - end),
            end + 1
        ));
    }
    if out.is_empty() {
        out = format!("({shown} is empty)");
    }
    Ok(out)
}

/// A walker of `dir` that respects ignore files but shows hidden files (not `.git`).
fn walker(dir: &Path) -> ignore::Walk {
    ignore::WalkBuilder::new(dir)
        .hidden(false)
        .require_git(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build()
}

fn glob(pattern: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("bad glob `{pattern}`: {e}"))
}

fn list_files(root: &Path, dir: &Path, pattern: &str, max: usize) -> Result<String, String> {
    let matcher = glob(pattern).map_err(|e| format!("list_files: {e}"))?;
    let mut found = vec![];
    let mut more = 0usize;
    for entry in walker(dir).flatten() {
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        if !matcher.is_match(rel) {
            continue;
        }
        if found.len() < MAX_LISTED {
            found.push(path::shown(root, entry.path()));
        } else {
            more += 1;
        }
    }
    found.sort();
    let mut out = found.join("\n");
    if found.is_empty() {
        out = format!("no files match {pattern}");
    }
    if more > 0 {
        out.push_str(&format!("\n[truncated: {} more files]", grouped(more)));
    }
    Ok(cap(&out, max))
}

fn search(
    root: &Path,
    at: &Path,
    pattern: &str,
    glob_filter: Option<&str>,
    case_insensitive: bool,
    max: usize,
) -> Result<String, String> {
    let matcher = RegexMatcherBuilder::new()
        .case_insensitive(case_insensitive)
        .build(pattern)
        .map_err(|e| format!("search: bad pattern: {e}"))?;
    let filter = glob_filter
        .map(glob)
        .transpose()
        .map_err(|e| format!("search: {e}"))?;
    let mut searcher = SearcherBuilder::new()
        .binary_detection(BinaryDetection::quit(0))
        .line_number(true)
        .build();
    let mut out: Vec<String> = vec![];
    let mut more = 0usize;
    for entry in walker(at).flatten() {
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        if let Some(f) = &filter {
            let rel = entry.path().strip_prefix(at).unwrap_or(entry.path());
            if !f.is_match(rel) && !entry.path().file_name().is_some_and(|n| f.is_match(n)) {
                continue;
            }
        }
        let shown = path::shown(root, entry.path());
        let _ = searcher.search_path(
            &matcher,
            entry.path(),
            sinks::UTF8(|line, text| {
                if out.len() < MAX_MATCHES {
                    out.push(format!("{shown}:{line}:{}", text.trim_end()));
                } else {
                    more += 1;
                }
                Ok(true)
            }),
        );
    }
    let mut text = if out.is_empty() {
        format!("no matches for {pattern}")
    } else {
        out.join("\n")
    };
    if more > 0 {
        text.push_str(&format!("\n[truncated: {} more matches]", grouped(more)));
    }
    Ok(cap(&text, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_replaces_one_exact_match_and_refuses_missing_or_ambiguous_ones() {
        assert_eq!(edit("a b c", "b", "x", false).unwrap(), ("a x c".into(), 1));
        assert!(
            edit("a b c", "z", "x", false)
                .unwrap_err()
                .contains("not found")
        );
        let e = edit("b b", "b", "x", false).unwrap_err();
        assert!(e.contains("occurs 2 times"), "{e}");
        assert_eq!(edit("b b", "b", "x", true).unwrap(), ("x x".into(), 2));
        assert!(edit("abc", "", "x", false).is_err());
    }

    #[test]
    fn cap_says_how_much_was_cut() {
        assert_eq!(cap("short", 10), "short");
        let long = "x".repeat(12_355);
        let c = cap(&long, 10);
        assert!(c.ends_with("[truncated: 12,345 more bytes]"), "{c}");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(999), "999");
    }

    #[tokio::test]
    async fn file_tools_work_in_the_workspace_and_refuse_what_the_role_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let all = vec![
            "read_file",
            "write_file",
            "edit_file",
            "list_files",
            "search",
        ];
        let tb = Toolbox::new(dir.path(), all, "builder", Limits::default()).unwrap();
        let cancel = CancellationToken::new();
        let call = |name: &str, input: Value| Call {
            id: "1".into(),
            name: name.into(),
            input,
        };
        let w = tb
            .run(
                &call(
                    "write_file",
                    json!({"path": "src/a.rs", "content": "fn a() {}\nfn b() {}\n"}),
                ),
                &cancel,
            )
            .await;
        assert!(!w.is_error, "{w:?}");
        let e = tb
            .run(
                &call(
                    "edit_file",
                    json!({"path": "src/a.rs", "old_string": "fn b", "new_string": "fn c"}),
                ),
                &cancel,
            )
            .await;
        assert!(!e.is_error, "{e:?}");
        let r = tb
            .run(
                &call(
                    "read_file",
                    json!({"path": "src/a.rs", "offset": 2, "limit": 1}),
                ),
                &cancel,
            )
            .await;
        assert_eq!(r.text, "     2\tfn c() {}\n");
        let l = tb
            .run(&call("list_files", json!({"pattern": "**/*.rs"})), &cancel)
            .await;
        assert_eq!(l.text, "src/a.rs");
        let s = tb
            .run(&call("search", json!({"pattern": "fn [ac]"})), &cancel)
            .await;
        assert_eq!(s.text, "src/a.rs:1:fn a() {}\nsrc/a.rs:2:fn c() {}");
        let esc = tb
            .run(&call("read_file", json!({"path": "../x"})), &cancel)
            .await;
        assert!(
            esc.is_error && esc.text.contains("outside the workspace"),
            "{esc:?}"
        );
        let denied = tb
            .run(&call("bash", json!({"command": "true"})), &cancel)
            .await;
        assert!(denied.is_error && denied.text.contains("not allowed for the builder role"));
    }
}

//! Roles: what each kind of agent is told and what it may do. One place for the system prompt
//! of every role (with the structured output sections forward context is cut from), its tools
//! (least privilege: analysts, planners and reviewers cannot write files, only builders,
//! integrators and testers may run shell commands), its permission mode and its default model, each
//! overridable in the worker's config file (`[roles.<name>]`).
//!
//! The workflow planner (a [`JobKind::Plan`] job, whatever its role) is a profile of its own,
//! `workflow_planner`: read-only tools and a JSON-only answer.

use crate::sandbox::Allowance;
use orch_shared::job::{JobKind, JobSpec, McpServer};
use orch_shared::role::Role;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Claude Code tools that only read.
pub const READ_TOOLS: &[&str] = &["Read", "Glob", "Grep", "LS"];
/// Claude Code tools that change files.
pub const WRITE_TOOLS: &[&str] = &["Write", "Edit", "MultiEdit", "NotebookEdit"];
/// Claude Code tools that run commands.
pub const SHELL_TOOLS: &[&str] = &["Bash", "BashOutput", "KillShell"];
/// Tools no role gets by default: they reach outside the workspace (the network, sub-agents
/// whose own tools are not the role's) or schedule work beyond the job.
pub const OUTSIDE_TOOLS: &[&str] = &[
    "WebFetch",
    "WebSearch",
    "Task",
    "Agent",
    "CronCreate",
    "ScheduleWakeup",
];

/// The native tools of the `anthropic` and `openai` backends' tool loop, by the Claude Code tool
/// that grants them: one role table serves every backend. Only a bare name grants a tool: a
/// rule such as `Bash(git *)` narrows Claude Code's Bash, which the native `bash` tool cannot
/// do, so it grants nothing here.
pub const NATIVE_TOOLS: &[(&str, &str)] = &[
    ("Read", "read_file"),
    ("Glob", "list_files"),
    ("LS", "list_files"),
    ("Grep", "search"),
    ("Write", "write_file"),
    ("Edit", "edit_file"),
    ("MultiEdit", "edit_file"),
    ("Bash", "bash"),
];

/// The permission modes the Claude Code CLI accepts.
pub const PERMISSION_MODES: &[&str] = &[
    "default",
    "acceptEdits",
    "plan",
    "bypassPermissions",
    "dontAsk",
    "auto",
    "manual",
];

/// Hosts a builder and a tester reach through the sandbox's proxy by default: the package
/// registries of the common toolchains.
pub const REGISTRY_HOSTS: &[&str] = &[
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "registry.npmjs.org",
    "pypi.org",
    "files.pythonhosted.org",
    "proxy.golang.org",
    "sum.golang.org",
];

/// Which profile a job gets: its role's, or the workflow planner's for a plan job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Role(Role),
    WorkflowPlanner,
}

impl Key {
    pub fn of(job: &JobSpec) -> Key {
        match job.kind {
            JobKind::Plan => Key::WorkflowPlanner,
            // A check runs under its role's sandbox (a tester's: shell, package registries).
            JobKind::Agent | JobKind::Check => Key::Role(job.role),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Key::Role(r) => r.as_str(),
            Key::WorkflowPlanner => "workflow_planner",
        }
    }

    /// A config key: a role name or `workflow_planner`.
    pub fn parse(name: &str) -> Result<Key, String> {
        if name == "workflow_planner" {
            return Ok(Key::WorkflowPlanner);
        }
        name.parse::<Role>()
            .map(Key::Role)
            .map_err(|_| {
                format!(
                    "unknown role `{name}` (expected one of analyst, planner, builder, integrator, tester, reviewer, documenter, custom, workflow_planner)"
                )
            })
    }
}

/// Everything a backend needs to know about the role it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub system_prompt: String,
    /// Tools the agent may use without asking (Claude Code tool names or rules such as
    /// `Bash(git *)`); everything else is denied in the default `dontAsk` mode.
    pub allowed_tools: Vec<String>,
    /// Tools removed outright (deny rules win over any allow rule, including a repository's
    /// own `.claude/settings.json`).
    pub disallowed_tools: Vec<String>,
    /// Tool uses a person approves (`orchctl approvals`) before they run (`Tool` or
    /// `Tool(pattern)`, see [`crate::approvals::Rule`]); checked at load.
    pub ask_tools: Vec<crate::approvals::Rule>,
    pub permission_mode: String,
    /// The model when neither the job nor the backend's per-role table names one.
    pub model: Option<String>,
    /// The turn limit when the job sets none.
    pub max_turns: Option<u32>,
    /// What its jobs may do inside the agent sandbox (hosts, writable paths, limits).
    pub sandbox: Allowance,
    /// The native `bash` tool's timeout when the model gives none (else the worker's).
    pub bash_timeout: Option<std::time::Duration>,
    /// MCP servers whose tools the role's native tool loop agents may call (with the job's
    /// own; see [`Profile::grants_mcp`]).
    pub mcp_servers: BTreeMap<String, McpServer>,
}

impl Profile {
    /// The native tools this profile may use (see [`NATIVE_TOOLS`]): those an allowed tool
    /// grants and no disallowed tool also grants (deny wins).
    pub fn native_tools(&self) -> Vec<&'static str> {
        let granted = |list: &[String], native: &str| {
            NATIVE_TOOLS
                .iter()
                .any(|(claude, n)| *n == native && list.iter().any(|t| t == claude))
        };
        let mut out: Vec<&'static str> = vec![];
        for (_, native) in NATIVE_TOOLS {
            if !out.contains(native)
                && granted(&self.allowed_tools, native)
                && !granted(&self.disallowed_tools, native)
            {
                out.push(native);
            }
        }
        out
    }

    /// Whether an agent of this profile may call `tool` of the MCP server `server`, offered
    /// to the model as `mcp__<server>__<tool>` (Claude Code's name for it). A rule naming the
    /// tool, its server (`mcp__<server>`) or every MCP tool (`mcp__*`) grants or denies it;
    /// deny wins. With no rule, a role that may change files gets the tools and a read-only
    /// role does not (least privilege: a tool's effects are unknown).
    pub fn grants_mcp(&self, server: &str, tool: &str) -> bool {
        let names = [
            format!("mcp__{server}__{tool}"),
            format!("mcp__{server}"),
            "mcp__*".to_string(),
        ];
        let named = |list: &[String]| list.iter().any(|t| names.contains(t));
        if named(&self.disallowed_tools) {
            return false;
        }
        named(&self.allowed_tools) || self.native_tools().contains(&"write_file")
    }

    /// Whether some tool of `server` may be granted (a server none of whose tools can be is
    /// not started).
    pub fn may_use_mcp_server(&self, server: &str) -> bool {
        let whole = [format!("mcp__{server}"), "mcp__*".to_string()];
        if self.disallowed_tools.iter().any(|t| whole.contains(t)) {
            return false;
        }
        let prefix = format!("mcp__{server}__");
        self.native_tools().contains(&"write_file")
            || self
                .allowed_tools
                .iter()
                .any(|t| whole.contains(t) || t.starts_with(&prefix))
    }
}

/// A `[roles.<name>]` table of the worker's config file; every field replaces the default.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub system_prompt: Option<String>,
    /// Added after the (default or replaced) system prompt.
    pub append_system_prompt: Option<String>,
    pub allowed_tools: Option<Vec<String>>,
    pub disallowed_tools: Option<Vec<String>>,
    /// Tool uses that wait for a person's approval (`Bash`, `Bash(npm install*)`).
    pub ask_tools: Option<Vec<String>>,
    pub permission_mode: Option<String>,
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    /// Hosts reachable from the sandbox (`host`, `host:port`, `*.domain`); replaces the default.
    pub allowed_hosts: Option<Vec<String>>,
    /// More read-write paths in the sandbox (absolute).
    pub writable_paths: Option<Vec<PathBuf>>,
    /// The memory limit of one job, in MiB (0: the worker's `[sandbox] memory_max_mb`).
    pub memory_max_mb: Option<u64>,
    /// The process limit of one job (0: the worker's `[sandbox] pids_max`).
    pub pids_max: Option<u64>,
    /// The CPU limit of one job in cores (0: the worker's `[sandbox] cpus`).
    #[serde(default, deserialize_with = "orch_config::exact_f64_opt")]
    pub cpus: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub bash_timeout: Option<std::time::Duration>,
    /// MCP servers by name for the native tool loop; replaces the default (none).
    pub mcp_servers: Option<BTreeMap<String, McpServer>>,
}

/// The profile of every role, checked once when the config is loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct Roles {
    profiles: BTreeMap<Key, Profile>,
}

impl Default for Roles {
    fn default() -> Self {
        let mut profiles = BTreeMap::new();
        for role in Role::ALL {
            profiles.insert(Key::Role(role), default_profile(Key::Role(role)));
        }
        profiles.insert(Key::WorkflowPlanner, default_profile(Key::WorkflowPlanner));
        Self { profiles }
    }
}

impl Roles {
    /// The defaults with the config file's `[roles.*]` tables applied.
    pub fn with_overrides<'a>(
        overrides: impl IntoIterator<Item = (&'a String, &'a Override)>,
    ) -> Result<Self, String> {
        let mut roles = Self::default();
        for (name, o) in overrides {
            let key = Key::parse(name).map_err(|e| format!("roles.{name}: {e}"))?;
            let p = roles
                .profiles
                .get_mut(&key)
                .ok_or_else(|| format!("roles.{name}: no such profile"))?;
            if let Some(s) = &o.system_prompt {
                p.system_prompt = s.clone();
            }
            if let Some(s) = &o.append_system_prompt {
                p.system_prompt = format!("{}\n\n{s}", p.system_prompt);
            }
            if let Some(t) = &o.allowed_tools {
                p.allowed_tools = t.clone();
            }
            if let Some(t) = &o.disallowed_tools {
                p.disallowed_tools = t.clone();
            }
            if let Some(t) = &o.ask_tools {
                p.ask_tools = t
                    .iter()
                    .map(|r| crate::approvals::Rule::parse(r))
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("roles.{name}.ask_tools: {e}"))?;
            }
            if let Some(m) = &o.permission_mode {
                if !PERMISSION_MODES.contains(&m.as_str()) {
                    return Err(format!(
                        "roles.{name}.permission_mode: `{m}` is not one of {}",
                        PERMISSION_MODES.join(", ")
                    ));
                }
                p.permission_mode = m.clone();
            }
            if let Some(m) = &o.model {
                if m.trim().is_empty() {
                    return Err(format!("roles.{name}.model: must not be empty"));
                }
                p.model = Some(m.clone());
            }
            if let Some(h) = &o.allowed_hosts {
                if let Some(bad) = h.iter().find(|h| h.trim().is_empty() || h.contains('/')) {
                    return Err(format!(
                        "roles.{name}.allowed_hosts: `{bad}` is not a host, host:port or *.domain"
                    ));
                }
                p.sandbox.allowed_hosts = h.clone();
            }
            if let Some(w) = &o.writable_paths {
                if let Some(bad) = w.iter().find(|p| !p.is_absolute()) {
                    return Err(format!(
                        "roles.{name}.writable_paths: `{}` is not an absolute path",
                        bad.display()
                    ));
                }
                p.sandbox.writable = w.clone();
            }
            if let Some(mb) = o.memory_max_mb {
                p.sandbox.memory_max = (mb > 0).then_some(mb << 20);
            }
            if let Some(n) = o.pids_max {
                p.sandbox.pids_max = (n > 0).then_some(n);
            }
            if let Some(c) = o.cpus {
                p.sandbox.cpus = check_cpus(c).map_err(|e| format!("roles.{name}.cpus: {e}"))?;
            }
            if let Some(n) = o.max_turns {
                if n == 0 {
                    return Err(format!("roles.{name}.max_turns: must be at least 1"));
                }
                p.max_turns = Some(n);
            }
            if let Some(t) = o.bash_timeout {
                if t.is_zero() {
                    return Err(format!("roles.{name}.bash_timeout: must be longer than 0s"));
                }
                p.bash_timeout = Some(t);
            }
            if let Some(servers) = &o.mcp_servers {
                for (server, s) in servers {
                    s.check(server)
                        .map_err(|e| format!("roles.{name}.mcp_servers.{e}"))?;
                }
                p.mcp_servers = servers.clone();
            }
            for tool in p.allowed_tools.iter().chain(&p.disallowed_tools) {
                if tool.trim().is_empty() || tool.contains(',') {
                    return Err(format!(
                        "roles.{name}: tool names must be non-empty and without commas (`{tool}`)"
                    ));
                }
            }
        }
        Ok(roles)
    }

    pub fn profile(&self, key: Key) -> &Profile {
        // Every key has a profile: `default()` fills them all and overrides only edit them.
        &self.profiles[&key]
    }

    /// The profile of `job`: its role's, or the workflow planner's.
    pub fn for_job(&self, job: &JobSpec) -> &Profile {
        self.profile(Key::of(job))
    }
}

fn tools(lists: &[&[&str]]) -> Vec<String> {
    lists
        .iter()
        .flat_map(|l| l.iter().map(|t| t.to_string()))
        .collect()
}

fn default_profile(key: Key) -> Profile {
    let read_only = || tools(&[READ_TOOLS]);
    let writes = || tools(&[READ_TOOLS, WRITE_TOOLS]);
    let shell = || tools(&[READ_TOOLS, WRITE_TOOLS, SHELL_TOOLS]);
    let (allowed, denied) = match key {
        Key::Role(Role::Builder | Role::Integrator | Role::Tester) => {
            (shell(), tools(&[OUTSIDE_TOOLS]))
        }
        Key::Role(Role::Documenter | Role::Custom) => {
            (writes(), tools(&[SHELL_TOOLS, OUTSIDE_TOOLS]))
        }
        Key::Role(Role::Analyst | Role::Planner | Role::Reviewer) | Key::WorkflowPlanner => (
            read_only(),
            tools(&[WRITE_TOOLS, SHELL_TOOLS, OUTSIDE_TOOLS]),
        ),
    };
    Profile {
        system_prompt: system_prompt(key),
        allowed_tools: allowed,
        disallowed_tools: denied,
        ask_tools: vec![],
        permission_mode: "dontAsk".into(),
        model: None,
        max_turns: None,
        sandbox: Allowance {
            allowed_hosts: match key {
                Key::Role(Role::Builder | Role::Integrator | Role::Tester) => {
                    REGISTRY_HOSTS.iter().map(|h| h.to_string()).collect()
                }
                _ => vec![],
            },
            ..Allowance::default()
        },
        bash_timeout: None,
        mcp_servers: BTreeMap::new(),
    }
}

/// The sections every agent ends its answer with; the coordinator cuts the next agent's
/// forward context from them.
pub const OUTPUT_FORMAT: &str = "\
## Output format
End your answer with exactly these four markdown sections; the next agent receives them as its
context, so make them self-contained and short:

## Summary
What you did and the outcome, in a few sentences.

## Files
Each file you created, changed or relied on, one per line with a few words on what it is.
Write `- none` if there are none.

## Key Findings
Facts the next agent needs: decisions made, problems found, test results (N passed, M failed),
open questions.

## For Next Agent
What the next agent should do first and what to watch out for.";

const EFFICIENCY: &str = "\
## Efficiency
- Be targeted: search with Glob and Grep before reading, and read only the files that matter.
- Do not repeat work an earlier agent reports in your context; build on it.
- Stop when the task is done. Quality over quantity: speed and cost matter.";

fn system_prompt(key: Key) -> String {
    let (who, duties, rules): (&str, &str, &str) = match key {
        Key::Role(Role::Analyst) => (
            "You are the ANALYST of a team of coding agents: you research and analyse, you never change files.",
            "- Understand the requirements and the relevant parts of the codebase.\n\
             - Investigate root causes and identify patterns, dependencies and constraints.\n\
             - Gather exactly what the planner or builder needs to act.",
            "- Provide just enough research for informed planning, not a thesis: if the problem is\n  \
               straightforward, say so quickly.\n\
             - You have read-only tools; do not try to write files or run commands.",
        ),
        Key::Role(Role::Planner) => (
            "You are the PLANNER of a team of coding agents: you turn analysis into an implementation plan, you never change files.",
            "- Break the work into concrete, ordered steps with the files each one touches.\n\
             - Name dependencies between steps, risks and how to verify each step.\n\
             - Give clear success criteria the builder and tester can check.",
            "- Keep the plan as small as the task allows.\n\
             - You have read-only tools; write the plan in your answer, not in files.",
        ),
        Key::Role(Role::Builder) => (
            "You are the BUILDER of a team of coding agents: you implement the change.",
            "- Follow the plan and the findings in your context.\n\
             - Write clean, maintainable code that follows the codebase's existing patterns and conventions.\n\
             - Build and run what you changed to check that it works.",
            "- Change only what the task needs; do not refactor unrelated code.\n\
             - Run shell commands inside the workspace only.",
        ),
        Key::Role(Role::Integrator) => (
            "You are the INTEGRATOR of a team of coding agents: you merge the work of agents that ran in parallel.",
            "- Your workspace holds a merge in progress: the files that conflict carry conflict markers.\n\
             - For each conflict, read both sides and the code around them, and write the version that keeps\n  \
               what both changes meant to do; never drop one side's change to make the conflict go away.\n\
             - Remove every conflict marker, then build and run the tests that cover the merged code.",
            "- Change only what the merge needs: no new features, no refactoring.\n\
             - Do not commit, abort or restart the merge: your result is committed as the merge when you finish.\n\
             - Run shell commands inside the workspace only.",
        ),
        Key::Role(Role::Tester) => (
            "You are the TESTER of a team of coding agents: you verify the change with tests.",
            "- Write or update tests for what changed: the happy path and the important edge cases.\n\
             - Run the tests and report the exact results (N passed, M failed, with the failures).\n\
             - Fix test code; report bugs in the product code rather than rewriting it.",
            "- Scope your testing tightly to what changed.\n\
             - Run shell commands inside the workspace only.",
        ),
        Key::Role(Role::Reviewer) => (
            "You are the REVIEWER of a team of coding agents: you review the change, you never change files.",
            "- Check the change against the task and the plan: correctness first, then security, then quality.\n\
             - Point out bugs, missing tests and risky patterns with file and line.\n\
             - Give actionable, specific feedback ordered by severity.",
            "- You have read-only tools; do not try to write files or run commands.\n\
             - Say plainly whether the change is ready.",
        ),
        Key::Role(Role::Documenter) => (
            "You are the DOCUMENTER of a team of coding agents: you write documentation.",
            "- Document what changed: usage, APIs, configuration, architecture, as the task asks.\n\
             - Write for the audience (users or developers) with short examples where they help.\n\
             - Verify every technical detail against the code.",
            "- Change documentation files only, not code.\n\
             - Keep it concise and scannable.",
        ),
        Key::Role(Role::Custom) => (
            "You are a specialised agent of a team of coding agents; your task defines your role.",
            "- Follow the task's instructions and constraints.",
            "- Ask for nothing interactively: decide and state your assumptions.",
        ),
        Key::WorkflowPlanner => {
            return "\
You are the workflow planner of a team of coding agents. You decide which agents run, in what
order and on what; you never change files and you do not do the work yourself. You may read the
repository (read-only tools) when the task cannot be judged without it, but keep that short.

Answer with a single JSON object exactly in the format the task asks for, and nothing else: no
prose before or after it and no markdown code fence."
                .to_string();
        }
    };
    format!(
        "{who}\n\n## Responsibilities\n{duties}\n\n## Rules\n{rules}\n\n{EFFICIENCY}\n\n{OUTPUT_FORMAT}"
    )
}

/// The agent's user prompt: the job's instruction, the plan's constraints, then the forward
/// context of the jobs it depends on.
pub fn user_prompt(job: &JobSpec) -> String {
    let mut out = job.prompt.trim_end().to_string();
    if !job.constraints.is_empty() {
        out.push_str("\n\n## Constraints\nYou must follow these:\n");
        for c in &job.constraints {
            out.push_str("- ");
            out.push_str(c.trim());
            out.push('\n');
        }
    }
    if let Some(ctx) = job.context.as_deref().filter(|c| !c.trim().is_empty()) {
        out.push_str("\n\n");
        if !ctx.trim_start().starts_with('#') {
            out.push_str("## Context from earlier agents\n");
        }
        out.push_str(ctx.trim_end());
        out.push('\n');
    }
    out
}

/// A CPU limit in cores: 0 is none, else between 0.01 and 1024.
pub fn check_cpus(cpus: f64) -> Result<Option<f64>, String> {
    if cpus == 0.0 {
        Ok(None)
    } else if (0.01..=1024.0).contains(&cpus) {
        Ok(Some(cpus))
    } else {
        Err(format!(
            "expected a number of cores between 0.01 and 1024 (0: no limit), got {cpus}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::ids::{JobId, TaskId};
    use orch_shared::job::Backend;

    #[test]
    fn mcp_tools_go_to_roles_that_may_write_unless_a_rule_says_otherwise() {
        let r = Roles::default();
        let builder = r.profile(Key::Role(Role::Builder));
        assert!(builder.grants_mcp("fs", "write_file"));
        assert!(builder.may_use_mcp_server("fs"));
        let mut reviewer = r.profile(Key::Role(Role::Reviewer)).clone();
        assert!(!reviewer.grants_mcp("fs", "read_text_file"));
        assert!(!reviewer.may_use_mcp_server("fs"));
        reviewer
            .allowed_tools
            .push("mcp__fs__read_text_file".into());
        assert!(reviewer.may_use_mcp_server("fs"));
        assert!(reviewer.grants_mcp("fs", "read_text_file"));
        assert!(!reviewer.grants_mcp("fs", "write_file"));
        assert!(!reviewer.may_use_mcp_server("fs2"));
        reviewer.allowed_tools.push("mcp__docs".into());
        assert!(reviewer.grants_mcp("docs", "search"));
        // Deny wins, for one tool, a server or every MCP tool.
        let mut b = builder.clone();
        b.disallowed_tools.push("mcp__fs__write_file".into());
        assert!(!b.grants_mcp("fs", "write_file") && b.grants_mcp("fs", "read_text_file"));
        b.disallowed_tools.push("mcp__*".into());
        assert!(!b.may_use_mcp_server("fs") && !b.grants_mcp("fs", "read_text_file"));
    }

    #[test]
    fn native_tools_follow_the_one_role_table_and_deny_wins() {
        let r = Roles::default();
        let native = |role| r.profile(Key::Role(role)).native_tools();
        assert_eq!(
            native(Role::Builder),
            [
                "read_file",
                "list_files",
                "search",
                "write_file",
                "edit_file",
                "bash"
            ]
        );
        assert_eq!(
            native(Role::Reviewer),
            ["read_file", "list_files", "search"]
        );
        assert_eq!(native(Role::Analyst), ["read_file", "list_files", "search"]);
        assert!(!native(Role::Documenter).contains(&"bash"));
        let mut p = r.profile(Key::Role(Role::Builder)).clone();
        p.disallowed_tools.push("Edit".into());
        p.allowed_tools.retain(|t| t != "Bash");
        p.allowed_tools.push("Bash(git *)".into());
        let n = p.native_tools();
        assert!(!n.contains(&"edit_file") && !n.contains(&"bash"), "{n:?}");
    }

    fn job(role: Role, kind: JobKind) -> JobSpec {
        JobSpec {
            context: Some(
                "## Context from the Analyst Agent (previous step)\n### Summary\nmapped\n".into(),
            ),
            backend: Backend::ClaudeCode,
            kind,
            constraints: vec!["touch only src/cache.rs".into()],
            ..JobSpec::new(
                TaskId::from_u128(1),
                JobId::from_u128(2),
                role,
                "Implement: a cache",
            )
        }
    }

    #[test]
    fn only_builders_integrators_and_testers_run_shell_and_read_only_roles_cannot_write() {
        let roles = Roles::default();
        for role in Role::ALL {
            let p = roles.profile(Key::Role(role));
            let may = |t: &str| p.allowed_tools.iter().any(|a| a == t);
            let denied = |t: &str| p.disallowed_tools.iter().any(|a| a == t);
            let shell = matches!(role, Role::Builder | Role::Integrator | Role::Tester);
            assert_eq!(may("Bash"), shell, "{role}");
            assert_eq!(denied("Bash"), !shell, "{role}");
            let writes = !matches!(role, Role::Analyst | Role::Planner | Role::Reviewer);
            assert_eq!(may("Write"), writes, "{role}");
            assert_eq!(denied("Edit"), !writes, "{role}");
            assert!(denied("WebFetch"), "{role}");
            assert!(p.system_prompt.contains("## For Next Agent"), "{role}");
            assert_eq!(p.permission_mode, "dontAsk");
        }
        let planner = roles.for_job(&job(Role::Planner, JobKind::Plan));
        assert!(planner.system_prompt.contains("JSON"));
        assert!(
            !planner
                .allowed_tools
                .iter()
                .any(|t| t == "Write" || t == "Bash")
        );
    }

    #[test]
    fn overrides_replace_fields_and_are_checked() {
        let mut o = BTreeMap::new();
        o.insert(
            "reviewer".to_string(),
            Override {
                model: Some("claude-opus-4-5".into()),
                allowed_tools: Some(vec!["Read".into(), "Bash(git diff *)".into()]),
                append_system_prompt: Some("Focus on SQL injection.".into()),
                ..Default::default()
            },
        );
        let roles = Roles::with_overrides(&o).unwrap();
        let r = roles.profile(Key::Role(Role::Reviewer));
        assert_eq!(r.model.as_deref(), Some("claude-opus-4-5"));
        assert_eq!(r.allowed_tools, ["Read", "Bash(git diff *)"]);
        assert!(r.system_prompt.ends_with("Focus on SQL injection."));
        assert!(r.system_prompt.starts_with("You are the REVIEWER"));

        let bad = |name: &str, o: Override| {
            let mut m = BTreeMap::new();
            m.insert(name.to_string(), o);
            Roles::with_overrides(&m).unwrap_err()
        };
        let servers = |name: &str, s: McpServer| Override {
            mcp_servers: Some([(name.to_string(), s)].into()),
            ..Default::default()
        };
        let e = bad(
            "tester",
            servers(
                "docs",
                McpServer {
                    url: Some("docs.example.com".into()),
                    ..Default::default()
                },
            ),
        );
        assert!(e.starts_with("roles.tester.mcp_servers.docs.url:"), "{e}");
        let e = bad("tester", servers("a b", McpServer::default()));
        assert!(e.starts_with("roles.tester.mcp_servers.a b:"), "{e}");
        assert!(bad("scout", Override::default()).starts_with("roles.scout:"));
        assert!(
            bad(
                "builder",
                Override {
                    permission_mode: Some("ask".into()),
                    ..Default::default()
                }
            )
            .starts_with("roles.builder.permission_mode:")
        );
        assert!(
            bad(
                "tester",
                Override {
                    max_turns: Some(0),
                    ..Default::default()
                }
            )
            .starts_with("roles.tester.max_turns:")
        );
    }

    #[test]
    fn the_user_prompt_has_the_instruction_constraints_and_forward_context() {
        let p = user_prompt(&job(Role::Builder, JobKind::Agent));
        let (i, c, x) = (
            p.find("Implement: a cache").unwrap(),
            p.find("- touch only src/cache.rs").unwrap(),
            p.find("### Summary\nmapped").unwrap(),
        );
        assert!(i < c && c < x, "{p}");
        let mut bare = job(Role::Builder, JobKind::Agent);
        bare.context = None;
        bare.constraints.clear();
        assert_eq!(user_prompt(&bare), "Implement: a cache");
    }
}

//! The plan format: what the LLM planner returns and what `orchctl submit --plan FILE` sends.
//!
//! ```json
//! {"complexity": "medium", "rationale": "...", "skip_reasoning": "...",
//!  "steps": [{"role": "analyst", "scope": "map the parser"},
//!            {"role": "builder", "scope": "add the cache", "depends_on": [0]},
//!            {"role": "tester",  "scope": "cover the cache", "depends_on": [1], "constraints": ["unit tests only"]}]}
//! ```
//! `depends_on` lists 0-based step indices. A step without `depends_on` depends on the step
//! before it in a sequential task and on nothing in a parallel one. The planner's own field
//! names (`workflow`, `agent_role` in upper case) are accepted too.
//!
//! `paths` is a step's file scope: the globs of repository paths it intends to edit
//! (`["src/cache/**", "Cargo.toml"]`, relative to the repository's root, `/` separated). The
//! coordinator warns when running agents' edits overlap ([`Scope`]) and, with
//! `serialize_conflicts`, holds a step whose scope overlaps a running one's.

use crate::role::Role;
use serde::{Deserialize, Serialize};

/// The heading after which a planner prompt carries the user's task, verbatim, to its end.
pub const TASK_HEADING: &str = "## Task description\n";

/// Reads a plan out of an agent's answer: the JSON object in it, with or without a markdown
/// code fence around it, checked for a valid dependency graph.
pub fn parse_answer(answer: &str, sequential: bool) -> Result<PlanSpec, String> {
    let start = answer
        .find('{')
        .ok_or("the answer contains no JSON object")?;
    let end = answer
        .rfind('}')
        .ok_or("the answer contains no JSON object")?;
    if end < start {
        return Err("the answer contains no JSON object".into());
    }
    let spec: PlanSpec = serde_json::from_str(&answer[start..=end])
        .map_err(|e| format!("the plan is not valid: {e}"))?;
    spec.dependencies(sequential).map_err(|e| e.to_string())?;
    Ok(spec)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complexity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationale: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reasoning: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_estimated_cost: Option<f64>,
    #[serde(alias = "workflow")]
    pub steps: Vec<PlanStep>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanStep {
    #[serde(alias = "agent_role", deserialize_with = "role_any_case")]
    pub role: Role,
    /// What this agent should do.
    #[serde(default)]
    pub scope: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_tokens: Option<u64>,
    /// `None`: the default for the task's mode (see the module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<u32>>,
    /// `parallel` makes a step without `depends_on` independent even in a sequential task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_mode: Option<String>,
    /// The file scope: globs of the repository paths this step intends to edit.
    #[serde(default, alias = "file_scope", skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

fn role_any_case<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// A plan that cannot run; the message says which step and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("plan.steps: the plan has no steps")]
    Empty,
    #[error("plan.steps: {0} steps is more than the limit of {MAX_STEPS}")]
    TooMany(usize),
    #[error("plan.steps[{step}].depends_on: step {dep} does not exist (steps are numbered from 0)")]
    Dangling { step: usize, dep: u32 },
    #[error("plan.steps[{step}].depends_on: a step cannot depend on itself")]
    SelfLoop { step: usize },
    #[error("plan.steps: dependency cycle through steps {0:?}")]
    Cycle(Vec<usize>),
    #[error("plan.steps[{step}].execution_mode: expected sequential or parallel, got `{got}`")]
    Mode { step: usize, got: String },
    #[error("plan.steps[{step}].paths[{index}]: {why}")]
    Path {
        step: usize,
        index: usize,
        why: String,
    },
}

/// Most steps one plan may have.
pub const MAX_STEPS: usize = 64;

impl PlanSpec {
    /// The parents of every step once defaults are applied (`sequential` = the task's mode).
    pub fn dependencies(&self, sequential: bool) -> Result<Vec<Vec<u32>>, PlanError> {
        if self.steps.is_empty() {
            return Err(PlanError::Empty);
        }
        if self.steps.len() > MAX_STEPS {
            return Err(PlanError::TooMany(self.steps.len()));
        }
        let mut deps = Vec::with_capacity(self.steps.len());
        for (i, step) in self.steps.iter().enumerate() {
            let parallel = match step.execution_mode.as_deref() {
                None | Some("sequential") => false,
                Some("parallel") => true,
                Some(other) => {
                    return Err(PlanError::Mode {
                        step: i,
                        got: other.to_string(),
                    });
                }
            };
            let d = match &step.depends_on {
                Some(d) => d.clone(),
                None if sequential && !parallel && i > 0 => vec![i as u32 - 1],
                None => vec![],
            };
            for &dep in &d {
                if dep as usize >= self.steps.len() {
                    return Err(PlanError::Dangling { step: i, dep });
                }
                if dep as usize == i {
                    return Err(PlanError::SelfLoop { step: i });
                }
            }
            if let Err((index, why)) = Scope::new(&step.paths) {
                return Err(PlanError::Path {
                    step: i,
                    index,
                    why,
                });
            }
            let mut d = d;
            d.sort_unstable();
            d.dedup();
            deps.push(d);
        }
        if let Some(cycle) = find_cycle(&deps) {
            return Err(PlanError::Cycle(cycle));
        }
        Ok(deps)
    }
}

/// Most globs in one step's `paths`.
pub const MAX_SCOPE_GLOBS: usize = 64;

/// A step's file scope, compiled: which paths it covers and whether two scopes may overlap.
#[derive(Debug, Clone)]
pub struct Scope {
    globs: Vec<String>,
    set: globset::GlobSet,
}

impl Scope {
    /// The scope of `globs`; an invalid one is refused with its index and why.
    pub fn new(globs: &[String]) -> Result<Scope, (usize, String)> {
        if globs.len() > MAX_SCOPE_GLOBS {
            return Err((
                MAX_SCOPE_GLOBS,
                format!("at most {MAX_SCOPE_GLOBS} globs per step"),
            ));
        }
        let mut set = globset::GlobSetBuilder::new();
        for (i, g) in globs.iter().enumerate() {
            let bad = |why: &str| Err((i, format!("`{g}` {why}")));
            if g.trim().is_empty() {
                return bad("is empty");
            }
            if g.starts_with('/') || g.contains('\\') {
                return bad("must be a repository path relative to its root, `/` separated");
            }
            if g.split('/').any(|part| part == "..") {
                return bad("must not leave the repository (`..`)");
            }
            let glob = globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| (i, format!("`{g}` is not a valid glob: {}", e.kind())))?;
            set.add(glob);
        }
        let set = set.build().map_err(|e| (0, e.to_string()))?;
        Ok(Scope {
            globs: globs.to_vec(),
            set,
        })
    }

    /// The scope of globs that were validated before (an invalid one covers nothing).
    pub fn of(globs: &[String]) -> Scope {
        Scope::new(globs).unwrap_or_else(|_| Scope {
            globs: vec![],
            set: globset::GlobSet::empty(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.globs.is_empty()
    }

    /// Whether `path` (relative to the repository's root) is in the scope.
    pub fn covers(&self, path: &str) -> bool {
        self.set.is_match(path)
    }

    /// The globs of `self` that may cover a path `other` covers too. Two globs may overlap when
    /// one's literal start (up to its first wildcard) begins the other's; a glob without
    /// wildcards overlaps another glob it matches. Conservative: `*.rs` and `src/a.md` are
    /// said to overlap (the start of one is empty), `src/a.rs` and `docs/**` are not.
    pub fn overlap(&self, other: &Scope) -> Vec<String> {
        let mut out = Vec::new();
        for a in &self.globs {
            let hit = other.globs.iter().any(|b| match (literal(a), literal(b)) {
                (true, true) => a == b,
                (true, false) => other.covers(a),
                (false, true) => self.covers(b),
                (false, false) => {
                    let (pa, pb) = (prefix(a), prefix(b));
                    pa.starts_with(pb) || pb.starts_with(pa)
                }
            });
            if hit {
                out.push(a.clone());
            }
        }
        out
    }
}

/// Whether a glob has no wildcard (it names one path).
fn literal(glob: &str) -> bool {
    !glob.contains(['*', '?', '[', '{'])
}

/// A glob's literal start, up to its first wildcard.
fn prefix(glob: &str) -> &str {
    glob.find(['*', '?', '[', '{'])
        .map_or(glob, |at| &glob[..at])
}

/// A cycle in the dependency graph, as the steps on it, if there is one.
fn find_cycle(deps: &[Vec<u32>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        n: usize,
        deps: &[Vec<u32>],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[n] = Mark::Active;
        path.push(n);
        for &d in &deps[n] {
            let d = d as usize;
            match marks[d] {
                Mark::Active => {
                    let start = path.iter().position(|&p| p == d).unwrap_or(0);
                    return Some(path[start..].to_vec());
                }
                Mark::New => {
                    if let Some(c) = visit(d, deps, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[n] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; deps.len()];
    for n in 0..deps.len() {
        if marks[n] == Mark::New {
            let mut path = Vec::new();
            if let Some(c) = visit(n, deps, &mut marks, &mut path) {
                return Some(c);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: &str) -> PlanSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn planner_field_names_and_upper_case_roles_are_accepted() {
        let p = plan(
            r#"{"complexity":"simple","workflow":[{"agent_role":"BUILDER","scope":"x"},{"agent_role":"Tester","scope":"y"}]}"#,
        );
        assert_eq!(p.steps[0].role, Role::Builder);
        assert_eq!(p.dependencies(true).unwrap(), vec![vec![], vec![0]]);
        assert_eq!(
            p.dependencies(false).unwrap(),
            vec![Vec::<u32>::new(), vec![]]
        );
    }

    #[test]
    fn bad_plans_are_rejected_with_the_reason() {
        assert_eq!(
            plan(r#"{"steps":[]}"#).dependencies(true),
            Err(PlanError::Empty)
        );
        let dangling = plan(r#"{"steps":[{"role":"builder","depends_on":[3]}]}"#);
        assert_eq!(
            dangling.dependencies(true),
            Err(PlanError::Dangling { step: 0, dep: 3 })
        );
        let cyclic = plan(
            r#"{"steps":[{"role":"builder","depends_on":[2]},{"role":"tester","depends_on":[0]},{"role":"reviewer","depends_on":[1]}]}"#,
        );
        assert_eq!(
            cyclic.dependencies(true),
            Err(PlanError::Cycle(vec![0, 2, 1]))
        );
        let selfish = plan(r#"{"steps":[{"role":"builder","depends_on":[0]}]}"#);
        assert_eq!(
            selfish.dependencies(true),
            Err(PlanError::SelfLoop { step: 0 })
        );
        assert!(serde_json::from_str::<PlanSpec>(r#"{"steps":[{"role":"scout"}]}"#).is_err());
    }

    #[test]
    fn answers_are_read_through_code_fences() {
        let answer = "Here is the plan:\n```json\n{\"workflow\":[{\"agent_role\":\"BUILDER\",\"scope\":\"x\"}]}\n```\n";
        assert_eq!(
            parse_answer(answer, true).unwrap().steps[0].role,
            Role::Builder
        );
        assert!(
            parse_answer("no plan here", true)
                .unwrap_err()
                .contains("no JSON")
        );
        let err =
            parse_answer(r#"{"steps":[{"role":"builder","depends_on":[0]}]}"#, true).unwrap_err();
        assert!(err.contains("cannot depend on itself"), "{err}");
        let err = parse_answer(r#"{"steps":[{"role":"wizard"}]}"#, true).unwrap_err();
        assert!(err.contains("unknown role"), "{err}");
    }

    #[test]
    fn scopes_are_checked_and_compared() {
        let p = plan(
            r#"{"steps":[{"role":"builder","paths":["src/cache/**","Cargo.toml"]},{"role":"builder","file_scope":["src/[a"]}]}"#,
        );
        assert_eq!(p.steps[0].paths, ["src/cache/**", "Cargo.toml"]);
        let err = p.dependencies(false).unwrap_err();
        assert!(
            matches!(
                &err,
                PlanError::Path {
                    step: 1,
                    index: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("plan.steps[1].paths[0]: `src/[a` is not a valid glob"),
            "{err}"
        );
        for bad in ["/etc/passwd", "../x", "a/../../b", " "] {
            assert!(Scope::new(&[bad.to_string()]).is_err(), "{bad}");
        }
        let s = |g: &[&str]| Scope::of(&g.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let cache = s(&["src/cache/**", "Cargo.toml"]);
        assert!(cache.covers("src/cache/lru.rs") && cache.covers("Cargo.toml"));
        assert!(!cache.covers("src/main.rs") && !cache.covers("x/Cargo.toml"));
        assert!(s(&["src/*.rs"]).covers("src/a.rs") && !s(&["src/*.rs"]).covers("src/a/b.rs"));
        assert_eq!(cache.overlap(&s(&["src/**/*.rs"])), ["src/cache/**"]);
        assert_eq!(cache.overlap(&s(&["Cargo.*"])), ["Cargo.toml"]);
        assert!(cache.overlap(&s(&["docs/**", "src/main.rs"])).is_empty());
        assert!(s(&["greet.sh"]).overlap(&s(&["greet.sh"])).len() == 1);
        assert!(s(&["a.sh"]).overlap(&s(&["b.sh"])).is_empty());
        assert!(s(&[]).overlap(&cache).is_empty());
    }

    #[test]
    fn diamond_is_fine() {
        let p = plan(
            r#"{"steps":[{"role":"analyst"},{"role":"builder","depends_on":[0]},{"role":"documenter","depends_on":[0]},{"role":"reviewer","depends_on":[1,2,1]}]}"#,
        );
        assert_eq!(
            p.dependencies(true).unwrap(),
            vec![vec![], vec![0], vec![0], vec![1, 2]]
        );
    }
}

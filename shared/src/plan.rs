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

//! Turns a prompt into a plan of role-specialised steps: the original tool's hard-coded
//! templates, its `auto` keyword mode (fixed: whole words, roles in pipeline order), and custom
//! role lists.

use orch_shared::plan::{PlanSpec, PlanStep};
use orch_shared::role::Role;

/// A plan and the rule that produced it. Each step's instruction is `"<scope>: <prompt>"`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The template name, `auto`, `custom` (a role list) or `user` (a plan given with the task).
    pub source: String,
    pub spec: PlanSpec,
}

impl Plan {
    fn from_steps(source: &str, steps: impl IntoIterator<Item = (Role, String)>) -> Plan {
        Plan {
            source: source.into(),
            spec: PlanSpec {
                steps: steps
                    .into_iter()
                    .map(|(role, scope)| PlanStep {
                        role,
                        scope,
                        constraints: vec![],
                        estimated_tokens: None,
                        depends_on: None,
                        execution_mode: None,
                        paths: vec![],
                    })
                    .collect(),
                ..Default::default()
            },
        }
    }

    pub fn roles(&self) -> Vec<Role> {
        self.spec.steps.iter().map(|s| s.role).collect()
    }
}

/// The instruction an agent gets for `step` of a task with `prompt`.
pub fn instruction(step: &PlanStep, prompt: &str) -> String {
    if step.scope.trim().is_empty() {
        format!("{} work: {prompt}", step.role)
    } else {
        format!("{}: {prompt}", step.scope.trim())
    }
}

/// The plan could not be made; the message names the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("task_type: unknown task type `{0}` (expected one of {TASK_TYPE_NAMES})")]
    UnknownTaskType(String),
    #[error("roles: must name at least one role")]
    NoRoles,
}

const TASK_TYPE_NAMES: &str = "auto, feature_implementation, bug_fix, code_review, documentation, \
     refactoring, testing, investigation, simple_implementation, simple_fix, custom";

/// The task types a user can ask for, with what they do.
pub const TASK_TYPES: &[(&str, &str)] = &[
    (
        "auto",
        "roles picked from keywords in the prompt, in pipeline order",
    ),
    (
        "feature_implementation",
        "analyst → planner → builder → tester → reviewer; builder → tester when simple",
    ),
    (
        "bug_fix",
        "analyst → planner → builder → tester → reviewer; builder → tester when simple",
    ),
    ("code_review", "analyst → planner → reviewer → tester"),
    ("documentation", "analyst → planner → documenter → reviewer"),
    ("refactoring", "as feature_implementation"),
    ("testing", "as feature_implementation"),
    ("investigation", "as feature_implementation"),
    ("simple_implementation", "builder → tester"),
    ("simple_fix", "builder → tester"),
    (
        "custom",
        "the roles given with `roles`, or as feature_implementation",
    ),
];

type Template = &'static [(Role, &'static str)];

const FEATURE_IMPLEMENTATION: Template = &[
    (
        Role::Analyst,
        "Analyze the requirements and the existing code",
    ),
    (Role::Planner, "Design the implementation plan"),
    (Role::Builder, "Implement the feature following the plan"),
    (Role::Tester, "Write and run tests for the implementation"),
    (
        Role::Reviewer,
        "Review the implementation for correctness and quality",
    ),
];
const BUG_FIX: Template = &[
    (Role::Analyst, "Investigate the bug and find its root cause"),
    (Role::Planner, "Plan the fix"),
    (Role::Builder, "Implement the fix following the plan"),
    (Role::Tester, "Verify the fix with tests"),
    (Role::Reviewer, "Review the fix"),
];
const SIMPLE_IMPLEMENTATION: Template = &[
    (Role::Builder, "Implement"),
    (Role::Tester, "Test the implementation (basic checks only)"),
];
const SIMPLE_FIX: Template = &[
    (Role::Builder, "Fix the bug"),
    (Role::Tester, "Verify the fix (basic checks only)"),
];
const CODE_REVIEW: Template = &[
    (Role::Analyst, "Analyze the code under review"),
    (Role::Planner, "Plan the review"),
    (Role::Reviewer, "Review the code"),
    (Role::Tester, "Check the code's tests"),
];
const DOCUMENTATION: Template = &[
    (Role::Analyst, "Analyze what needs documenting"),
    (Role::Planner, "Plan the documentation"),
    (Role::Documenter, "Write the documentation"),
    (Role::Reviewer, "Review the documentation"),
];

/// The planner agent's instructions: the original tool's rubric, then the task. The answer must
/// be a JSON plan ([`orch_shared::plan`]); it is validated, and replaced by [`plan`]'s when it is
/// not valid.
pub fn planner_prompt(prompt: &str, task_type: &str) -> String {
    format!(
        r#"You are the Workflow Planner of a team of coding agents. Decide which agents run, in what
order, and what each must do, for the task below. Answer with JSON only.

Available roles: ANALYST, PLANNER, BUILDER, TESTER, REVIEWER, DOCUMENTER.

Complexity rubric:
- SIMPLE (one file, under 50 lines): BUILDER -> TESTER (basic checks). Skip ANALYST and REVIEWER.
- MEDIUM (several files, under 200 lines): ANALYST (quick) -> BUILDER -> TESTER -> REVIEWER.
- COMPLEX (over 200 lines, or architecture work): ANALYST (thorough) -> PLANNER -> BUILDER ->
  TESTER (comprehensive) -> REVIEWER.
- DOCUMENTATION: DOCUMENTER -> REVIEWER, or ANALYST -> DOCUMENTER -> REVIEWER. Never use
  PLANNER or BUILDER for documentation.

Rules:
- Skip agents aggressively: every agent costs time and money.
- Scope the TESTER tightly to what changed.
- Pass large outputs through files, not through the next agent's prompt.
- Steps that do not depend on each other may run in parallel: say so with depends_on.
- Give each step that edits files its file scope in paths: globs of the repository paths it
  will edit (e.g. "src/cache/**"), so parallel steps that would edit the same files are seen.

Answer format:
{{"complexity": "simple|medium|complex", "rationale": "...",
 "workflow": [{{"agent_role": "BUILDER", "scope": "...", "constraints": ["..."],
               "estimated_tokens": 20000, "depends_on": [], "paths": ["src/..."]}}],
 "total_estimated_cost": 0.10, "skip_reasoning": "..."}}
depends_on lists 0-based indices of earlier steps.

Task type: {task_type}
{heading}{prompt}"#,
        heading = orch_shared::plan::TASK_HEADING,
    )
}

/// Makes the plan for a task: a user plan wins, then a custom role list, then the task type.
pub fn plan(
    task_type: &str,
    prompt: &str,
    roles: Option<&[Role]>,
    user_plan: Option<PlanSpec>,
) -> Result<Plan, Error> {
    if let Some(spec) = user_plan {
        return Ok(Plan {
            source: "user".into(),
            spec,
        });
    }
    if let Some(roles) = roles {
        if roles.is_empty() {
            return Err(Error::NoRoles);
        }
        return Ok(Plan::from_steps(
            "custom",
            roles.iter().map(|&r| (r, format!("{r} work"))),
        ));
    }
    let simple = is_simple(prompt);
    let (name, template) = match task_type {
        "auto" => {
            return Ok(Plan::from_steps(
                "auto",
                auto_roles(prompt)
                    .into_iter()
                    .map(|r| (r, format!("{r} work"))),
            ));
        }
        "feature_implementation" | "refactoring" | "testing" | "investigation" | "custom" => {
            if simple {
                ("simple_implementation", SIMPLE_IMPLEMENTATION)
            } else {
                ("feature_implementation", FEATURE_IMPLEMENTATION)
            }
        }
        "bug_fix" => {
            if simple {
                ("simple_fix", SIMPLE_FIX)
            } else {
                ("bug_fix", BUG_FIX)
            }
        }
        "simple_implementation" => ("simple_implementation", SIMPLE_IMPLEMENTATION),
        "simple_fix" => ("simple_fix", SIMPLE_FIX),
        "code_review" => ("code_review", CODE_REVIEW),
        "documentation" => ("documentation", DOCUMENTATION),
        other => return Err(Error::UnknownTaskType(other.to_string())),
    };
    Ok(Plan::from_steps(
        name,
        template
            .iter()
            .map(|&(role, text)| (role, text.to_string())),
    ))
}

/// Lower-cased words of the prompt, split on anything that is not a letter or digit.
fn words(prompt: &str) -> Vec<String> {
    prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The template planner's complexity rule: complex on a complexity keyword; simple on a
/// "simple" phrase; otherwise simple below 50 words.
pub fn is_simple(prompt: &str) -> bool {
    const COMPLEX: &[&str] = &[
        "refactor",
        "redesign",
        "migrate",
        "architecture",
        "research",
        "analyze",
        "investigate",
        "comprehensive",
        "system",
        "multiple",
    ];
    const SIMPLE_PHRASES: &[&str] = &[
        "write a",
        "create a simple",
        "add a simple",
        "fix a simple",
        "simple function",
        "quick fix",
    ];
    let words = words(prompt);
    if words.iter().any(|w| COMPLEX.contains(&w.as_str())) {
        return false;
    }
    let joined = format!(" {} ", words.join(" "));
    if SIMPLE_PHRASES
        .iter()
        .any(|p| joined.contains(&format!(" {p} ")))
    {
        return true;
    }
    words.len() < 50
}

/// `auto`: the roles whose keywords appear as whole words, in pipeline order; analyst →
/// planner → builder when none does.
pub fn auto_roles(prompt: &str) -> Vec<Role> {
    const KEYWORDS: &[(Role, &[&str])] = &[
        (
            Role::Planner,
            &["plan", "organize", "decompose", "breakdown", "strategy"],
        ),
        (
            Role::Builder,
            &["implement", "build", "create", "develop", "code"],
        ),
        (
            Role::Reviewer,
            &["review", "check", "verify", "validate", "audit"],
        ),
        (
            Role::Analyst,
            &["analyze", "research", "investigate", "study"],
        ),
        (
            Role::Tester,
            &["test", "testing", "verify", "validate", "qa"],
        ),
        (
            Role::Documenter,
            &["document", "docs", "readme", "documentation"],
        ),
    ];
    let words = words(prompt);
    let mut roles: Vec<Role> = KEYWORDS
        .iter()
        .filter(|(_, kws)| words.iter().any(|w| kws.contains(&w.as_str())))
        .map(|(r, _)| *r)
        .collect();
    if roles.is_empty() {
        return vec![Role::Analyst, Role::Planner, Role::Builder];
    }
    roles.sort();
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(p: &Plan) -> Vec<Role> {
        p.roles()
    }

    fn plan(t: &str, prompt: &str, roles: Option<&[Role]>) -> Result<Plan, Error> {
        super::plan(t, prompt, roles, None)
    }

    #[test]
    fn auto_roles_come_in_pipeline_order() {
        // The original listed reviewer before analyst (dictionary order).
        assert_eq!(
            auto_roles("review and analyze then build it"),
            vec![Role::Analyst, Role::Builder, Role::Reviewer]
        );
        assert_eq!(
            auto_roles("write docs and test them"),
            vec![Role::Tester, Role::Documenter]
        );
    }

    #[test]
    fn auto_matches_whole_words_only() {
        // "codebase" contained "code" and "contest" contained "test" in the original.
        assert_eq!(
            auto_roles("tidy the codebase contest"),
            vec![Role::Analyst, Role::Planner, Role::Builder]
        );
        assert_eq!(auto_roles("Code it!"), vec![Role::Builder]);
    }

    #[test]
    fn templates_pick_by_complexity() {
        let p = plan("feature_implementation", "add a login button", None).unwrap();
        assert_eq!(p.source, "simple_implementation");
        assert_eq!(roles(&p), vec![Role::Builder, Role::Tester]);
        assert_eq!(
            instruction(&p.spec.steps[0], "add a login button"),
            "Implement: add a login button"
        );

        let p = plan("feature_implementation", "redesign the auth system", None).unwrap();
        assert_eq!(p.source, "feature_implementation");
        assert_eq!(
            roles(&p),
            vec![
                Role::Analyst,
                Role::Planner,
                Role::Builder,
                Role::Tester,
                Role::Reviewer
            ]
        );
        let p = plan("bug_fix", "investigate the crash", None).unwrap();
        assert_eq!(p.source, "bug_fix");
        let p = plan("bug_fix", "quick fix for the typo", None).unwrap();
        assert_eq!(p.source, "simple_fix");
        let p = plan("documentation", "anything", None).unwrap();
        assert_eq!(
            roles(&p),
            vec![
                Role::Analyst,
                Role::Planner,
                Role::Documenter,
                Role::Reviewer
            ]
        );
        let p = plan("code_review", "anything", None).unwrap();
        assert_eq!(
            roles(&p),
            vec![Role::Analyst, Role::Planner, Role::Reviewer, Role::Tester]
        );
    }

    #[test]
    fn long_prompts_are_complex() {
        let long = "word ".repeat(60);
        assert!(!is_simple(&long));
        assert!(is_simple("write a function"));
        assert!(!is_simple("write a system"));
    }

    #[test]
    fn custom_roles_win_and_must_not_be_empty() {
        let p = plan("auto", "x", Some(&[Role::Tester, Role::Analyst])).unwrap();
        assert_eq!(p.source, "custom");
        assert_eq!(roles(&p), vec![Role::Tester, Role::Analyst]);
        assert_eq!(plan("auto", "x", Some(&[])), Err(Error::NoRoles));
    }

    #[test]
    fn unknown_task_type_names_the_field_and_the_choices() {
        let err = plan("nope", "x", None).unwrap_err().to_string();
        assert!(
            err.starts_with("task_type: unknown task type `nope`"),
            "{err}"
        );
        assert!(err.contains("feature_implementation"));
        for (name, _) in TASK_TYPES {
            assert!(plan(name, "x", None).is_ok(), "{name}");
        }
    }
}

//! Agent roles. One enum across every layer (the original had an upper-case and a lower-case one).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use strum::VariantNames;

/// A role-specialised agent. The declaration order is the pipeline order used whenever roles are
/// chosen automatically (analysis before planning before building, and so on).
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    Debug,
    strum::EnumIter,
    strum::IntoStaticStr,
    strum::VariantNames,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Role {
    Analyst,
    Planner,
    Builder,
    /// Resolves the conflicts between job branches that the task branch could not merge.
    Integrator,
    Tester,
    Reviewer,
    Documenter,
    Custom,
}

impl Role {
    /// Every role, in pipeline order.
    pub const ALL: [Role; 8] = [
        Role::Analyst,
        Role::Planner,
        Role::Builder,
        Role::Integrator,
        Role::Tester,
        Role::Reviewer,
        Role::Documenter,
        Role::Custom,
    ];

    pub fn as_str(&self) -> &'static str {
        self.into()
    }

    /// The agent's display name, as the original tool showed it.
    pub fn agent_name(&self) -> String {
        let s = self.as_str();
        let mut name = s[..1].to_uppercase();
        name.push_str(&s[1..]);
        name.push_str(" Agent");
        name
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no role.
#[derive(Debug, thiserror::Error)]
#[error("unknown role `{0}` (expected one of {expected})", expected = Role::VARIANTS.join(", "))]
pub struct RoleError(pub String);

impl FromStr for Role {
    type Err = RoleError;
    fn from_str(s: &str) -> Result<Self, RoleError> {
        let lower = s.trim().to_ascii_lowercase();
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == lower)
            .ok_or_else(|| RoleError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_case_insensitively() {
        assert_eq!("BUILDER".parse::<Role>().unwrap(), Role::Builder);
        assert_eq!(" tester ".parse::<Role>().unwrap(), Role::Tester);
        assert!("scout".parse::<Role>().is_err());
    }

    #[test]
    fn declaration_order_is_pipeline_order() {
        let mut sorted = Role::ALL;
        sorted.sort();
        assert_eq!(sorted, Role::ALL);
        assert_eq!(Role::Analyst.agent_name(), "Analyst Agent");
    }
}

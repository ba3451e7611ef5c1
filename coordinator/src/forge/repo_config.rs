//! A repository's own settings for the tasks that work in it: `.orch.toml` at the root of the
//! task's base (the submit's `ref`, else the default branch), read through the forge at submit
//! (the coordinator runs no git, so only a coordinator with a forge configured reads it). Every
//! key is optional; what a submit gives explicitly wins over the file. `docs/forge.md` shows
//! the format.
//!
//! ```toml
//! serialize_conflicts = true  # as `submit --serialize-conflicts`
//! sparse_checkout = true      # as `submit --sparse-checkout`
//!
//! [check]
//! command = "cargo test"      # as `submit --check`
//! rounds = 3                  # as `submit --check-rounds`
//!
//! [pr]
//! open = true                 # open a pull request for every task (as `submit --pr`)
//! repo = "acme/app"           # owner/name on the forge (as `--pr-repo`)
//! base = "develop"            # the branch tasks start from and pull requests target
//! labels = ["agents"]         # when the submit gives none (as `--pr-label`)
//! draft = true                # draft while the check runs (as `--pr-draft`)
//! ```

use orch_shared::api::{PrRequest, SubmitTask};
use serde::Deserialize;

/// The file's path in the repository.
pub const FILE: &str = ".orch.toml";

/// Largest file read, in bytes.
pub const MAX_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    #[serde(default)]
    pub check: Option<CheckSection>,
    #[serde(default)]
    pub pr: Option<PrSection>,
    #[serde(default)]
    pub serialize_conflicts: Option<bool>,
    #[serde(default)]
    pub sparse_checkout: Option<bool>,
}

/// `[check]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSection {
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub rounds: Option<u32>,
}

/// `[pr]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrSection {
    #[serde(default)]
    pub open: Option<bool>,
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub draft: Option<bool>,
}

/// Why the file was refused: the key at fault (`check.rounds`; `(file)` for a file that is
/// not TOML at all) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl Invalid {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The file's settings; a malformed file names the key at fault. The values are checked as
/// far as the file alone can tell; the submit checks the merged request as it checks any.
pub fn parse(text: &str) -> Result<RepoConfig, Invalid> {
    if text.len() > MAX_BYTES {
        return Err(Invalid::new(
            "(file)",
            format!("larger than {MAX_BYTES} bytes"),
        ));
    }
    // Syntax first (its error has a line, not a key), then the shape, whose error has a path.
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text.get(..s.start).unwrap_or("").matches('\n').count() + 1);
        let message = e.message().trim().to_string();
        Invalid::new(
            "(file)",
            match line {
                Some(n) => format!("line {n}: {message}"),
                None => message,
            },
        )
    })?;
    let config: RepoConfig =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." { "(file)" } else { &path };
            Invalid::new(key, e.into_inner().to_string())
        })?;
    if let Some(check) = &config.check {
        if check
            .command
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(Invalid::new("check.command", "must not be empty"));
        }
        if check.rounds.is_some_and(|n| !(1..=10).contains(&n)) {
            return Err(Invalid::new("check.rounds", "must be between 1 and 10"));
        }
        if check.rounds.is_some() && check.command.is_none() {
            return Err(Invalid::new(
                "check.rounds",
                "needs check.command: the command to run",
            ));
        }
    }
    if let Some(pr) = &config.pr {
        if pr.repo.as_deref().is_some_and(|r| !super::valid_repo(r)) {
            return Err(Invalid::new("pr.repo", "expected owner/name"));
        }
        if pr.base.as_deref().is_some_and(|b| b.trim().is_empty()) {
            return Err(Invalid::new("pr.base", "must not be empty"));
        }
        if pr
            .labels
            .iter()
            .flatten()
            .any(|l| l.trim().is_empty() || l.chars().count() > 50)
        {
            return Err(Invalid::new("pr.labels", "labels of 1 to 50 characters"));
        }
    }
    Ok(config)
}

impl RepoConfig {
    /// Fills what `req` leaves out from the file: the submit's own fields win (a submit's
    /// check command takes its own rounds, never the file's).
    pub fn apply(&self, req: &mut SubmitTask) {
        if let Some(check) = &self.check
            && req.check.is_none()
            && let Some(command) = &check.command
        {
            req.check = Some(command.clone());
            if req.check_rounds.is_none() {
                req.check_rounds = check.rounds;
            }
        }
        if req.serialize_conflicts.is_none() {
            req.serialize_conflicts = self.serialize_conflicts;
        }
        if req.sparse_checkout.is_none() {
            req.sparse_checkout = self.sparse_checkout;
        }
        let Some(pr) = &self.pr else {
            return;
        };
        if req.git_ref.is_none() {
            req.git_ref.clone_from(&pr.base);
        }
        if req.pr.is_none() && pr.open == Some(true) {
            req.pr = Some(PrRequest::default());
        }
        if let Some(asked) = req.pr.as_mut() {
            if asked.repo.is_none() {
                asked.repo.clone_from(&pr.repo);
            }
            if asked.labels.is_empty() {
                asked.labels = pr.labels.clone().unwrap_or_default();
            }
            if asked.draft.is_none() {
                asked.draft = pr.draft;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_file_names_its_key() {
        let err = |text: &str| parse(text).unwrap_err();
        assert_eq!(err("[check]\nrounds = \"three\"\n").key, "check.rounds");
        assert_eq!(err("[pr]\nopen = 1\n").key, "pr.open");
        assert_eq!(err("check = \"make\"\n").key, "check");
        let unknown = err("[check]\ncommand = \"make\"\nrund = 2\n");
        assert_eq!(unknown.key, "check.rund");
        assert!(
            unknown.message.contains("unknown field `rund`"),
            "{unknown}"
        );
        assert_eq!(err("chekc = 1").key, "chekc");
        assert_eq!(err("[check]\ncommand = \" \"").key, "check.command");
        assert_eq!(
            err("[check]\ncommand = \"make\"\nrounds = 0").key,
            "check.rounds"
        );
        assert_eq!(err("[check]\nrounds = 2").key, "check.rounds");
        assert_eq!(err("[pr]\nlabels = [\"\"]").key, "pr.labels");
        assert_eq!(err("[pr]\nlabels = [\"a\", 2]").key, "pr.labels[1]");
        assert_eq!(err("[pr]\nrepo = \"nope\"").key, "pr.repo");
        let syntax = err("[check\ncommand = 1");
        assert_eq!(syntax.key, "(file)");
        assert!(syntax.message.starts_with("line 1: "), "{syntax}");
        assert_eq!(parse("").unwrap(), RepoConfig::default());
    }

    #[test]
    fn the_submit_wins_over_the_file() {
        let file = parse(
            "serialize_conflicts = true\nsparse_checkout = true\n[check]\ncommand = \"make test\"\n\
             rounds = 2\n[pr]\nopen = true\nrepo = \"acme/app\"\nbase = \"develop\"\nlabels = [\"agents\"]\ndraft = false\n",
        )
        .unwrap();
        let mut req = SubmitTask::default();
        file.apply(&mut req);
        assert_eq!(req.check.as_deref(), Some("make test"));
        assert_eq!(req.check_rounds, Some(2));
        assert_eq!(req.git_ref.as_deref(), Some("develop"));
        assert_eq!(req.serialize_conflicts, Some(true));
        assert_eq!(req.sparse_checkout, Some(true));
        let pr = req.pr.unwrap();
        assert_eq!(pr.repo.as_deref(), Some("acme/app"));
        assert_eq!(
            (pr.labels, pr.draft),
            (vec!["agents".to_string()], Some(false))
        );

        let mut req = SubmitTask {
            check: Some("cargo test".into()),
            git_ref: Some("main".into()),
            serialize_conflicts: Some(false),
            sparse_checkout: Some(false),
            pr: Some(PrRequest {
                repo: Some("acme/fork".into()),
                labels: vec!["mine".into()],
                draft: Some(true),
            }),
            ..Default::default()
        };
        file.apply(&mut req);
        assert_eq!(req.check.as_deref(), Some("cargo test"));
        assert_eq!(
            req.check_rounds, None,
            "the file's rounds go with its command"
        );
        assert_eq!(req.git_ref.as_deref(), Some("main"));
        assert_eq!(req.serialize_conflicts, Some(false));
        assert_eq!(req.sparse_checkout, Some(false));
        let pr = req.pr.unwrap();
        assert_eq!(pr.repo.as_deref(), Some("acme/fork"));
        assert_eq!(
            (pr.labels, pr.draft),
            (vec!["mine".to_string()], Some(true))
        );

        // Without `open`, the file's `[pr]` only shapes a pull request the submit asks for.
        let mut req = SubmitTask::default();
        parse("[pr]\nlabels = [\"x\"]").unwrap().apply(&mut req);
        assert_eq!(req.pr, None);
    }
}

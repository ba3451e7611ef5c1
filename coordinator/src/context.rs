//! Forward context: the short hand-over a finished agent passes to the next one, cut from the
//! structured sections its output is asked to contain (Summary, Files, Key Findings, For Next
//! Agent). The original matched role names in the wrong case, so its role-specific parsing never
//! ran; here every section is read for every role.

use orch_shared::role::Role;

/// Longest forward context passed on, in bytes; the rest is cut with a marker.
pub const MAX_CONTEXT_BYTES: usize = 8 * 1024;

const SECTIONS: &[(&str, &[&str])] = &[
    ("Summary", &["summary"]),
    (
        "Files",
        &[
            "files",
            "files created",
            "files modified",
            "files changed",
            "test files",
            "documentation files",
        ],
    ),
    ("Key Findings", &["key findings", "findings"]),
    (
        "For Next Agent",
        &[
            "for next agent",
            "recommendations for next agent",
            "next steps",
        ],
    ),
];

/// The forward context of `role`'s `output`, or `None` if it has no known section.
pub fn forward_context(role: Role, output: &str) -> Option<String> {
    let mut parts = Vec::new();
    for (title, aliases) in SECTIONS {
        let mut bodies = Vec::new();
        for (heading, body) in sections(output) {
            if aliases.contains(&heading.as_str()) && !body.is_empty() {
                bodies.push(body);
            }
        }
        if !bodies.is_empty() {
            parts.push(format!("### {title}\n{}", bodies.join("\n")));
        }
    }
    if parts.is_empty() {
        return None;
    }
    let mut text = format!(
        "## Context from the {} (previous step)\n{}",
        role.agent_name(),
        parts.join("\n\n")
    );
    if text.len() > MAX_CONTEXT_BYTES {
        let mut cut = MAX_CONTEXT_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[context truncated]");
    }
    Some(text)
}

/// `(lower-cased heading, trimmed body)` for every `#`-heading of the markdown.
fn sections(output: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in output.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') {
            let heading = trimmed.trim_start_matches('#').trim().trim_end_matches(':');
            out.push((heading.to_lowercase(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    for (_, body) in &mut out {
        *body = body.trim().to_string();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_known_sections_and_drops_the_rest() {
        let out = "intro\n## Summary\nDid the thing.\n## Rambling\nnoise\n## Files Modified\n- a.rs\n### Key Findings:\n- x is slow\n## Recommendations for Next Agent\nTest a.rs\n";
        let ctx = forward_context(Role::Analyst, out).unwrap();
        assert!(ctx.starts_with("## Context from the Analyst Agent"));
        assert!(ctx.contains("### Summary\nDid the thing."));
        assert!(ctx.contains("### Files\n- a.rs"));
        assert!(ctx.contains("### Key Findings\n- x is slow"));
        assert!(ctx.contains("### For Next Agent\nTest a.rs"));
        assert!(!ctx.contains("noise"));
    }

    #[test]
    fn no_sections_no_context() {
        assert_eq!(forward_context(Role::Builder, "just text"), None);
        assert_eq!(forward_context(Role::Builder, "## Summary\n\n"), None);
    }

    #[test]
    fn long_context_is_cut_on_a_char_boundary() {
        let out = format!("## Summary\n{}", "é".repeat(MAX_CONTEXT_BYTES));
        let ctx = forward_context(Role::Tester, &out).unwrap();
        assert!(ctx.len() <= MAX_CONTEXT_BYTES + 32);
        assert!(ctx.ends_with("[context truncated]"));
    }
}

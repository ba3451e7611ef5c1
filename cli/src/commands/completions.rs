//! `orchctl completions bash|zsh|fish`: the shell completion script on stdout (clap_complete).

use crate::commands::{Cli, Ctx};
use clap::CommandFactory;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl completions bash > ~/.local/share/bash-completion/completions/orchctl
  orchctl completions zsh > \"${fpath[1]}/_orchctl\"
  orchctl completions fish > ~/.config/fish/completions/orchctl.fish";

/// Print the shell completion script for bash, zsh or fish
#[derive(Debug, clap::Args)]
#[command(after_long_help = EXAMPLES)]
pub struct Args {
    /// The shell
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script for `shell`.
pub fn generate(shell: Shell, out: &mut dyn Write) {
    let mut cmd = Cli::command();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "orchctl", out);
}

pub async fn run(_ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    generate(args.shell, &mut out);
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_verbs() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut buf = Vec::new();
            generate(shell, &mut buf);
            let text = String::from_utf8(buf).unwrap();
            assert!(text.contains("orchctl"), "{shell:?}");
            assert!(text.contains("cost-report"), "{shell:?}");
        }
    }
}

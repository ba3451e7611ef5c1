//! Questions on the terminal (`init`, `clean`): asked on stderr, answered on stdin, only when
//! both are terminals; scripts pass flags instead.

use std::io::{BufRead, IsTerminal, Write};

/// Whether questions can be asked (stdin and stderr are terminals).
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks `question`, showing `default`; an empty answer takes the default.
pub fn ask(question: &str, default: &str) -> std::io::Result<String> {
    let mut err = std::io::stderr().lock();
    if default.is_empty() {
        write!(err, "{question}: ")?;
    } else {
        write!(err, "{question} [{default}]: ")?;
    }
    err.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let answer = line.trim();
    Ok(if answer.is_empty() {
        default.to_string()
    } else {
        answer.to_string()
    })
}

/// Asks a yes/no question; only `y` or `yes` is a yes.
pub fn confirm(question: &str) -> std::io::Result<bool> {
    let answer = ask(&format!("{question} (y/N)"), "")?;
    Ok(matches!(answer.to_lowercase().as_str(), "y" | "yes"))
}

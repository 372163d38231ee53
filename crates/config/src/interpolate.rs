//! `${VAR}` and `${VAR:-default}` interpolation in the raw configuration text, the way
//! Vector does it: secrets stay in the environment, and an unset variable is reported with
//! its line and column. `${file:/run/secrets/name}` is replaced by a file's content (a
//! mounted secret), without its trailing newline. `$$` writes a literal `$`. Comments are left alone, so a comment
//! may mention `${VAR}`.

/// An interpolation problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterpolationIssue {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Replaces every `${VAR}` / `${VAR:-default}` in `text`; reports every unset variable and
/// malformed reference rather than stopping at the first.
pub fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<InterpolationIssue>> {
    let mut out = String::with_capacity(text.len());
    let mut issues = Vec::new();
    for (line_no, full_line) in text.split_inclusive('\n').enumerate() {
        let (line, comment) = full_line.split_at(comment_start(full_line));
        let mut rest = line;
        let mut column = 1;
        while let Some(dollar) = rest.find('$') {
            out.push_str(&rest[..dollar]);
            column += rest[..dollar].chars().count();
            let after = &rest[dollar + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
                column += 2;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(close) = body.find('}') else {
                    issues.push(InterpolationIssue {
                        line: line_no + 1,
                        column,
                        message: "`${` without a closing `}`".into(),
                    });
                    out.push_str(&rest[dollar..]);
                    rest = "";
                    break;
                };
                let reference = &body[..close];
                if let Some(path) = reference.strip_prefix("file:") {
                    // A secret mounted as a file (Docker and Kubernetes secrets): its
                    // content, without the trailing newline.
                    match std::fs::read_to_string(path.trim()) {
                        Ok(content) => out.push_str(content.trim_end_matches(['\n', '\r'])),
                        Err(e) => issues.push(InterpolationIssue {
                            line: line_no + 1,
                            column,
                            message: format!("cannot read secret file `{}`: {e}", path.trim()),
                        }),
                    }
                    column += 2 + reference.chars().count() + 1;
                    rest = &body[close + 1..];
                    continue;
                }
                let (name, default) = match reference.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (reference, None),
                };
                let valid_name = !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !name.starts_with(|c: char| c.is_ascii_digit());
                if !valid_name {
                    issues.push(InterpolationIssue {
                        line: line_no + 1,
                        column,
                        message: format!(
                            "`${{{reference}}}` is not a variable reference (use ${{NAME}} or ${{NAME:-default}}; `$$` for a literal `$`)"
                        ),
                    });
                } else {
                    match (env(name), default) {
                        (Some(value), _) if !value.is_empty() || default.is_none() => {
                            out.push_str(&value)
                        }
                        (_, Some(default)) => out.push_str(default),
                        (None, None) => issues.push(InterpolationIssue {
                            line: line_no + 1,
                            column,
                            message: format!(
                                "environment variable `{name}` is not set (write ${{{name}:-default}} to give a default)"
                            ),
                        }),
                        (Some(_), None) => unreachable!("handled by the first arm"),
                    }
                }
                column += 2 + reference.chars().count() + 1;
                rest = &body[close + 1..];
            } else {
                out.push('$');
                rest = after;
                column += 1;
            }
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

/// Byte offset where a YAML comment starts on this line (`#` at the start or after white
/// space, outside quotes), or the line's length.
fn comment_start(line: &str) -> usize {
    let mut quote: Option<char> = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && previous.is_whitespace() => return i,
            None => {}
        }
        previous = c;
    }
    line.len()
}

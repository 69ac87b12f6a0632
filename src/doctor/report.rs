//! The human-readable report: grouped by severity, each finding with its object, why it matters
//! and the fix SQL; ANSI colours only when asked (stdout is a terminal).

use std::fmt::Write;

use super::{Report, Severity};

struct Style {
    on: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

pub(crate) fn render(report: &Report, color: bool) -> String {
    let style = Style { on: color };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rlsgate check: database {} as role {} (tenant setting {}, tenant columns: {})",
        report.database,
        report.role,
        report.tenant_setting,
        if report.tenant_columns.is_empty() {
            "none found".to_string()
        } else {
            report.tenant_columns.join(", ")
        }
    );
    if report.criticals() + report.warnings() == 0 {
        let _ = writeln!(out, "\n{}", style.paint("32;1", "No findings."));
    }
    for (severity, title, code, fix) in [
        (Severity::Critical, "CRITICAL", "31;1", "fix:"),
        (Severity::Warning, "WARNING", "33;1", "fix:"),
        (Severity::Note, "NOTE", "34;1", "instead:"),
    ] {
        let findings: Vec<_> = report
            .findings
            .iter()
            .filter(|f| f.severity == severity)
            .collect();
        if findings.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{} ({})", style.paint(code, title), findings.len());
        for f in findings {
            let _ = writeln!(
                out,
                "\n  {} {}",
                style.paint(code, &format!("[{}]", f.check)),
                style.paint("1", &f.object)
            );
            for line in wrap(&f.why, 92) {
                let _ = writeln!(out, "    {line}");
            }
            let _ = writeln!(out, "    {}", style.paint("2", fix));
            for line in f.fix.lines() {
                let _ = writeln!(out, "      {}", style.paint("36", line));
            }
        }
    }
    if report.criticals() + report.warnings() == 0 {
        return out;
    }
    let _ = writeln!(
        out,
        "\n{} critical, {} warning(s)",
        report.criticals(),
        report.warnings()
    );
    out
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

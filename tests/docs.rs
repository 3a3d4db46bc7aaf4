//! The reference in `docs/` against the code: every reason code and message status the code
//! knows is documented in `docs/reply-files.md`, with its meaning and what the ERP should do, and
//! nothing documented there is unknown to the code. (The configuration keys are checked the same
//! way by a unit test in `src/config`, which can see the raw image's serde derives.)

use std::collections::BTreeSet;

use smsdrop::sms::codes::{FileReason, LineReason, MessageStatus};

/// The codes in the first column of the table under `## <section>`, each row with its cells.
fn table(section: &str) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reply-files.md"))
        .expect("docs/reply-files.md");
    let heading = format!("## {section}");
    let mut rows = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("## ") {
            inside = line == heading;
            continue;
        }
        if let (true, Some(row)) = (inside, line.strip_prefix("| `")) {
            let code = row.split('`').next().unwrap_or_default().to_string();
            let cells = line
                .split('|')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect();
            rows.push((code, cells));
        }
    }
    assert!(!rows.is_empty(), "no table under {heading}");
    rows
}

fn check(section: &str, known: &[&str], columns: usize) {
    let rows = table(section);
    let documented: BTreeSet<&str> = rows.iter().map(|(c, _)| c.as_str()).collect();
    let known: BTreeSet<&str> = known.iter().copied().collect();
    assert_eq!(
        documented, known,
        "{section}: documented (left) against the code (right)"
    );
    for (code, cells) in &rows {
        assert_eq!(
            cells.len(),
            columns,
            "{section}: `{code}` has every column filled: {cells:?}"
        );
    }
}

#[test]
fn every_reason_code_and_status_is_documented_and_nothing_else_is() {
    let lines: Vec<&str> = LineReason::ALL.iter().map(|r| r.as_str()).collect();
    let files: Vec<&str> = FileReason::ALL.iter().map(|r| r.as_str()).collect();
    let statuses: Vec<&str> = MessageStatus::ALL.iter().map(|s| s.as_str()).collect();
    check("Line reason codes", &lines, 3);
    check("File reason codes", &files, 3);
    check("Message statuses", &statuses, 4);
    // The "final" column says what the code says.
    for (code, cells) in table("Message statuses") {
        let status = MessageStatus::parse(&code).expect("a known status");
        let final_ = if status.is_final() { "yes" } else { "no" };
        assert_eq!(cells[1], final_, "`{code}`");
    }
}

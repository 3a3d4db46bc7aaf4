//! The layer table (`docs/layers.md`) against the code: every `crate::` path in `src/` names a
//! module its own module may use. The table is ordered bottom-up and a module may only use
//! modules listed above it, so the modules cannot form a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const TABLE: &str = "docs/layers.md";

/// One row of the table.
struct Row {
    module: String,
    may_use: BTreeSet<String>,
}

/// The table's rows, in order.
fn table(root: &Path) -> Vec<Row> {
    let text = fs::read_to_string(root.join(TABLE)).expect("docs/layers.md is readable");
    let mut rows = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 5 && cells[0].is_empty() && cells[1].starts_with('`') {
            let module = cells[1].trim_matches('`').to_string();
            let may_use = cells[3]
                .split(',')
                .map(|m| m.trim().trim_matches('`').to_string())
                .filter(|m| !m.is_empty() && m != "—")
                .collect();
            rows.push(Row { module, may_use });
        }
    }
    rows
}

/// The top-level modules under `src/`.
fn modules(src: &Path) -> BTreeSet<String> {
    fs::read_dir(src)
        .expect("src/ is readable")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                Some(name)
            } else {
                name.strip_suffix(".rs").map(str::to_string)
            }
        })
        .filter(|m| m != "lib" && m != "main")
        .collect()
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable").filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source with comments blanked out (lengths and line breaks kept, so positions hold).
fn without_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        if in_str {
            if b[i] == b'\\' && i + 1 < b.len() {
                out.extend_from_slice(&b[i..i + 2]);
                i += 2;
                continue;
            }
            if b[i] == b'"' {
                in_str = false;
            }
            out.push(b[i]);
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            while i < b.len() && !b[i..].starts_with(b"*/") {
                out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                i += 1;
            }
            out.extend_from_slice(b"  ");
            i += 2;
        } else if b[i] == b'"' && !(i > 0 && b[i - 1] == b'\'' && b.get(i + 1) == Some(&b'\'')) {
            in_str = true;
            out.push(b[i]);
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every top-level module a file names through `crate::`, with the line it is named on.
fn uses(code: &str) -> Vec<(String, usize)> {
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if at > 0 && code.as_bytes()[at - 1].is_ascii_alphanumeric() {
            continue; // `smsdrop_crate::` or the like
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c, d::{e, f}}`: the names at the group's first level.
            let (mut depth, mut start) = (0usize, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 0 => {
                        start = false;
                        let name = ident_at(&group[i..]);
                        found.push((name.to_string(), line_of(at + "crate::{".len() + i)));
                    }
                    _ => {}
                }
            }
        } else {
            found.push((ident_at(rest).to_string(), line_of(at)));
        }
    }
    found
}

#[test]
fn every_crate_path_follows_the_layer_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let rows = table(root);
    let modules = modules(&src);
    let mut problems = Vec::new();

    // The table lists each module once, and only modules above a row may be used by it.
    let mut above = BTreeSet::new();
    let mut rules = BTreeMap::new();
    for row in &rows {
        if !modules.contains(&row.module) {
            problems.push(format!("{TABLE}: `{}` is not a module under src/", row.module));
        }
        for m in row.may_use.difference(&above) {
            problems.push(format!(
                "{TABLE}: `{}` may use `{m}`, which is not listed above it (the table is ordered bottom-up)",
                row.module
            ));
        }
        if rules.insert(row.module.clone(), row.may_use.clone()).is_some() {
            problems.push(format!("{TABLE}: `{}` is listed twice", row.module));
        }
        above.insert(row.module.clone());
    }
    for m in modules.difference(&above) {
        problems.push(format!("{TABLE}: the module `{m}` has no row"));
    }

    let mut all = Vec::new();
    files(&src, &mut all);
    all.sort();
    for path in &all {
        let rel = path.strip_prefix(root).expect("under the root");
        let inside = path.strip_prefix(&src).expect("under src");
        let first = inside.iter().next().expect("a name").to_string_lossy();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let code = without_comments(&fs::read_to_string(path).expect("readable"));
        if let Some(at) = code.find("super::super::") {
            problems.push(format!(
                "{}:{}: `super::super::` reaches out of its module; name other modules with `crate::`",
                rel.display(),
                code[..at].matches('\n').count() + 1
            ));
        }
        let allowed = rules.get(&module).cloned().unwrap_or_default();
        for (used, line) in uses(&code) {
            if used == module || used.is_empty() || allowed.contains(&used) {
                continue;
            }
            let listed: Vec<&str> = allowed.iter().map(String::as_str).collect();
            problems.push(format!(
                "{}:{line}: `crate::{used}`: `{module}` may not use `{used}` ({TABLE}: `{module}` may use {})",
                rel.display(),
                if listed.is_empty() {
                    "nothing of ours".to_string()
                } else {
                    listed.join(", ")
                }
            ));
        }
    }
    assert!(problems.is_empty(), "the layers are broken:\n{}", problems.join("\n"));
}

#[test]
fn the_path_reader_sees_groups_and_skips_comments() {
    let code = without_comments(
        "use crate::a::X; // crate::nope\n/* crate::nope2 */ use crate::{b::{C, D}, e,\n f};\nlet s = \"//\"; crate::g::h();",
    );
    let names: Vec<(String, usize)> = uses(&code);
    let names: Vec<(&str, usize)> = names.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    assert_eq!(names, [("a", 1), ("b", 2), ("e", 2), ("f", 3), ("g", 4)]);
}

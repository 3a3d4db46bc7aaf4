//! The code's shape: no function longer than a person can hold in their head.
//!
//! Every function, method and default trait method in `src/` is measured from its `fn` to its
//! closing brace, as `syn` reads it (so braces in strings and comments do not count). A function
//! over [`MOST_LINES`] fails the suite with its file, line and length: split it into steps that
//! each have a name. (A table of data or a flat `match` that only maps a variant to a call could
//! be longer; none is, so no exception is listed.)

use std::path::{Path, PathBuf};

use syn::visit::Visit;

const MOST_LINES: usize = 120;

/// A function's name, first line and length in lines.
struct Function {
    name: String,
    line: usize,
    lines: usize,
}

#[derive(Default)]
struct Measure {
    found: Vec<Function>,
}

impl Measure {
    fn add(&mut self, sig: &syn::Signature, block: &syn::Block) {
        let first = sig.fn_token.span.start().line;
        let last = block.brace_token.span.close().end().line;
        self.found.push(Function {
            name: sig.ident.to_string(),
            line: first,
            lines: last + 1 - first,
        });
    }
}

impl<'ast> Visit<'ast> for Measure {
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.add(&f.sig, &f.block);
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.add(&f.sig, &f.block);
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.add(&f.sig, block);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every function of `src/`: (file, function).
fn functions() -> Vec<(String, Function)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    files(&root.join("src"), &mut paths);
    let mut all = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("source is readable");
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut measure = Measure::default();
        measure.visit_file(&file);
        let name = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        all.extend(measure.found.into_iter().map(|f| (name.clone(), f)));
    }
    all
}

#[test]
fn no_function_is_longer_than_120_lines() {
    let all = functions();
    assert!(all.len() > 500, "src/ has its functions: {} found", all.len());
    let mut long: Vec<String> = all
        .iter()
        .filter(|(_, f)| f.lines > MOST_LINES)
        .map(|(file, f)| format!("{file}:{}: `{}` is {} lines long", f.line, f.name, f.lines))
        .collect();
    long.sort();
    assert!(
        long.is_empty(),
        "functions over {MOST_LINES} lines (split each into named steps):\n{}",
        long.join("\n")
    );
    let longest = all.iter().max_by_key(|(_, f)| f.lines).expect("a function");
    println!(
        "{} functions; the longest is {}:{} `{}`, {} lines",
        all.len(),
        longest.0,
        longest.1.line,
        longest.1.name,
        longest.1.lines
    );
}

//! Message templates: `"Bonjour {name}, votre code est {code}"`, filled from a line's columns.
//!
//! `{{` and `}}` stand for literal braces. A template is parsed once, when the configuration is
//! loaded, so a malformed one is a start-up error and rendering a line cannot fail on syntax.

use std::collections::HashMap;

/// A parsed template: literal text and variable names, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed `{{` at byte {0}")]
    Unclosed(usize),
    #[error("lone `}}` at byte {0} (write `}}}}` for a literal brace)")]
    LoneClose(usize),
    #[error("empty or invalid variable name at byte {0}")]
    BadName(usize),
}

impl Template {
    /// Parses `{name}` placeholders. Names are matched case-insensitively against column names.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, c)) => name.push(c),
                            None => return Err(TemplateError::Unclosed(at)),
                        }
                    }
                    let name = name.trim().to_lowercase();
                    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-') {
                        return Err(TemplateError::BadName(at));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Var(name));
                }
                '}' => return Err(TemplateError::LoneClose(at)),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    /// The variable names the template uses.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Fills the template. Returns the name of the first variable that is missing or empty.
    pub fn render(&self, vars: &HashMap<String, String>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => match vars.get(name) {
                    Some(v) if !v.trim().is_empty() => out.push_str(v),
                    _ => return Err(name.clone()),
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn renders_variables_and_escapes() {
        let t = Template::parse("Bonjour {Name}, code {{{code}}}").unwrap();
        assert_eq!(t.variables().collect::<Vec<_>>(), ["name", "code"]);
        let out = t.render(&vars(&[("name", "Zoé"), ("code", "42")])).unwrap();
        assert_eq!(out, "Bonjour Zoé, code {42}");
    }

    #[test]
    fn missing_or_empty_variable_is_named() {
        let t = Template::parse("Hi {name} {code}").unwrap();
        assert_eq!(t.render(&vars(&[("name", "A")])), Err("code".into()));
        assert_eq!(t.render(&vars(&[("name", " "), ("code", "1")])), Err("name".into()));
    }

    #[test]
    fn malformed_templates_are_refused() {
        for (src, err) in [
            ("Hi {name", TemplateError::Unclosed(3)),
            ("Hi } there", TemplateError::LoneClose(3)),
            ("Hi {}", TemplateError::BadName(3)),
            ("Hi {a b}", TemplateError::BadName(3)),
        ] {
            assert_eq!(Template::parse(src), Err(err), "{src}");
        }
    }
}

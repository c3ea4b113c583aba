//! The subject template: literal text with `{type}`, `{id}`, `{status}`,
//! `{version}` and `{at}` placeholders, `{{` and `}}` for literal braces.

/// A value a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Type,
    Id,
    Status,
    Version,
    At,
}

impl Field {
    const NAMES: [(&'static str, Field); 5] = [
        ("type", Field::Type),
        ("id", Field::Id),
        ("status", Field::Status),
        ("version", Field::Version),
        ("at", Field::At),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Value(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template; the error says which brace or placeholder is wrong.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.chars().any(char::is_control) {
            return Err(format!(
                "{text:?} holds a control character; a subject is one line"
            ));
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match c {
                '{' if rest.starts_with("{{") => {
                    literal.push('{');
                    rest = &rest[2..];
                }
                '}' if rest.starts_with("}}") => {
                    literal.push('}');
                    rest = &rest[2..];
                }
                '{' => {
                    let Some(end) = rest.find('}') else {
                        return Err(format!(
                            "{text:?} opens a placeholder that is not closed; write {{{{ for a \
                             literal {{"
                        ));
                    };
                    let name = &rest[1..end];
                    let Some((_, field)) = Field::NAMES.iter().find(|(n, _)| *n == name) else {
                        return Err(format!(
                            "{{{name}}} is not a placeholder; the subject knows {{type}}, {{id}}, \
                             {{status}}, {{version}} and {{at}}"
                        ));
                    };
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Value(*field));
                    rest = &rest[end + 1..];
                }
                '}' => {
                    return Err(format!(
                        "{text:?} has a }} that closes nothing; write }}}} for a literal }}"
                    ));
                }
                _ => {
                    literal.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template { pieces })
    }

    /// The text with every placeholder replaced by `value(field)`.
    pub fn render(&self, value: impl Fn(Field) -> String) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Value(field) => out.push_str(&value(*field)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(text: &str) -> Result<String, String> {
        Ok(Template::parse(text)?.render(|f| format!("<{f:?}>")))
    }

    #[test]
    fn placeholders_and_braces() {
        assert_eq!(
            render("{type} {id} is {status}").unwrap(),
            "<Type> <Id> is <Status>"
        );
        assert_eq!(
            render("{{v{version}}} at {at}!").unwrap(),
            "{v<Version>} at <At>!"
        );
        assert_eq!(render("").unwrap(), "");
        assert_eq!(render("été {id}").unwrap(), "été <Id>");
    }

    #[test]
    fn mistakes_are_explained() {
        for (text, want) in [
            ("{name}", "{name} is not a placeholder"),
            ("{id", "opens a placeholder that is not closed"),
            ("id}", "has a } that closes nothing"),
            ("{}", "{} is not a placeholder"),
            ("a\nb", "holds a control character"),
        ] {
            let e = render(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}

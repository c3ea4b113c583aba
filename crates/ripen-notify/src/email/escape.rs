//! Making untrusted text safe for a mail: one line for headers, HTML
//! entities for the HTML part, percent-encoding for a link, and length
//! limits.

/// The text on one line: every control character (CR and LF among them)
/// and every Unicode line or paragraph separator becomes a space.
pub(super) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if breaks_line(c) { ' ' } else { c })
        .collect()
}

/// Multi-line text with `\n` line ends: CRLF and lone CR become `\n`, other
/// control characters but tab become spaces.
pub(super) fn lines(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    s.chars()
        .map(|c| {
            if c == '\n' || c == '\t' || !breaks_line(c) {
                c
            } else {
                ' '
            }
        })
        .collect()
}

fn breaks_line(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// The text with `&`, `<`, `>`, `"` and `'` as HTML entities.
pub(super) fn html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The text as one URL path or fragment segment: every byte but the
/// unreserved ones (`A-Z a-z 0-9 - . _ ~`) percent-encoded.
pub(super) fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text cut to at most `max` characters; a cut text ends with `…`.
pub(super) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max.saturating_sub(1)) {
        Some((i, _)) if s[i..].chars().count() > 1 => format!("{}…", &s[..i]),
        _ => s.to_owned(),
    }
}

/// The characters of `s` that may stand in a Message-ID's left part.
pub(super) fn id_atom(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(one_line("a\r\nBcc: x\u{2028}y\u{85}z"), "a  Bcc: x y z");
        assert_eq!(lines("a\r\nb\rc\0d\te"), "a\nb\nc d\te");
        assert_eq!(
            html("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(
            url_segment("0193-ab_c.~d/e f?é"),
            "0193-ab_c.~d%2Fe%20f%3F%C3%A9"
        );
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcd", 4), "abcd");
        assert_eq!(truncate("ééééé", 3), "éé…");
        assert_eq!(id_atom("0193c5b2-x.y@z"), "0193c5b2-xyz");
    }

    proptest! {
        #[test]
        fn one_line_never_breaks_a_line(s in any::<String>()) {
            let out = one_line(&s);
            prop_assert!(!out.chars().any(breaks_line));
            prop_assert_eq!(out.chars().count(), s.chars().count());
        }

        #[test]
        fn lines_have_only_newlines_and_tabs(s in any::<String>()) {
            let out = lines(&s);
            prop_assert!(!out.contains('\r'));
            prop_assert!(!out.chars().any(|c| breaks_line(c) && c != '\n' && c != '\t'));
        }

        #[test]
        fn html_leaves_no_markup(s in any::<String>()) {
            let out = html(&s);
            prop_assert!(!out.contains(['<', '>', '"', '\'']));
            // Every & starts one of the entities written.
            for (i, _) in out.match_indices('&') {
                let rest = &out[i..];
                prop_assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"].iter().any(|e| rest.starts_with(e)),
                    "stray & in {:?}", out
                );
            }
            let back = out
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&amp;", "&");
            prop_assert_eq!(back, s);
        }

        #[test]
        fn url_segments_are_unreserved(s in any::<String>()) {
            let out = url_segment(&s);
            prop_assert!(out.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
        }

        #[test]
        fn truncate_keeps_a_prefix(s in any::<String>(), max in 1usize..40) {
            let out = truncate(&s, max);
            prop_assert!(out.chars().count() <= max);
            let kept = out.strip_suffix('…').unwrap_or(&out);
            prop_assert!(s.starts_with(kept));
            if s.chars().count() <= max {
                prop_assert_eq!(out, s);
            }
        }
    }
}

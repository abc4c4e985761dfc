//! Text that came from a peer, made safe to print.
//!
//! A server's `message`, `reason` or `request_id` is input like a file from
//! the internet: it can hold a newline that forges a log line, terminal escape
//! sequences that rewrite the operator's screen, bidirectional overrides that
//! make text read differently than it is, or a megabyte of anything. Every
//! such string passes through [`sanitize_text`] before it reaches a log, an
//! error, an event, the summary table or a metric label.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The default cap, in characters, for one string from the server once it
/// is sanitized (a reject message, a drain reason, a request id in a log).
pub const MAX_PEER_TEXT_CHARS: usize = 256;

/// Returns `input` with every control character escaped and its length capped
/// at `max_chars` characters (escapes count as the characters they print).
///
/// - C0 and C1 controls and DEL become `\n`, `\r`, `\t` or `\u{..}`, so a
///   newline cannot start a forged log line and an ESC cannot reach a
///   terminal.
/// - Unicode bidirectional overrides and isolates (U+202A–U+202E,
///   U+2066–U+2069) and zero-width characters that hide text are escaped
///   the same way.
/// - `\` itself is escaped as `\\`, so the output is unambiguous.
/// - Past `max_chars`, the rest is replaced by `…(+N bytes)`, where N counts
///   the bytes of `input` that were cut.
///
/// Borrows when nothing needed changing (the common case costs no
/// allocation).
pub fn sanitize_text(input: &str, max_chars: usize) -> Cow<'_, str> {
    let needs_work = input.chars().count() > max_chars || input.chars().any(needs_escape);
    if !needs_work {
        return Cow::Borrowed(input);
    }
    let mut out = String::with_capacity(input.len().min(max_chars * 2) + 16);
    let mut printed = 0usize;
    for (at, c) in input.char_indices() {
        let before = out.len();
        push_escaped(&mut out, c);
        let width = out[before..].chars().count();
        if printed + width > max_chars {
            out.truncate(before);
            let _ = write!(out, "…(+{} bytes)", input.len() - at);
            return Cow::Owned(out);
        }
        printed += width;
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200B}'..='\u{200F}' | '\u{FEFF}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let s = "registration denied by policy 7";
        assert!(matches!(sanitize_text(s, 256), Cow::Borrowed(x) if x == s));
    }

    #[test]
    fn newlines_and_escapes_cannot_forge_lines_or_reach_a_terminal() {
        let s = "ok\n2026-01-01T00:00:00Z  INFO forged line\x1b[2J\x1b]0;owned\x07";
        let out = sanitize_text(s, 256);
        assert!(!out.contains('\n'));
        assert!(!out.contains('\x1b'));
        assert!(!out.contains('\x07'));
        assert_eq!(
            out,
            "ok\\n2026-01-01T00:00:00Z  INFO forged line\\u{1b}[2J\\u{1b}]0;owned\\u{7}"
        );
    }

    #[test]
    fn bidi_overrides_and_backslashes_are_escaped() {
        assert_eq!(sanitize_text("a\u{202E}b", 256), "a\\u{202e}b");
        assert_eq!(sanitize_text("a\\nb", 256), "a\\\\nb");
        assert_eq!(sanitize_text("\u{85}", 256), "\\u{85}");
    }

    #[test]
    fn long_text_is_capped_and_says_how_much_was_cut() {
        let s = "x".repeat(10_000);
        let out = sanitize_text(&s, 10);
        assert_eq!(out, "xxxxxxxxxx…(+9990 bytes)");
        // An escape that would straddle the cap is cut whole.
        let out = sanitize_text("abcdefghi\n", 10);
        assert_eq!(out, "abcdefghi…(+1 bytes)");
    }

    #[test]
    fn multibyte_text_is_cut_on_a_character_boundary() {
        let s = "é".repeat(300);
        let out = sanitize_text(&s, 5);
        assert_eq!(out, "ééééé…(+590 bytes)");
    }
}

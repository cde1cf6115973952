//! Text from the network made safe to print.
//!
//! Names, reasons and JWT headers come from peers. Written as they are to a
//! terminal, a log line or a table, an ESC starts a terminal control
//! sequence (clear the screen, set the title, recolour), a newline forges
//! a log line or a table row, and a bidirectional override reorders what
//! the reader sees. [`printable`] writes each such character as its Rust
//! escape (`\n`, `\u{1b}`, `\u{202e}`) and leaves all other text alone.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal or a log as it is: a control
/// character (C0, DEL, C1) or a Unicode bidirectional mark, embedding,
/// override or isolate.
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with every [unprintable](is_unprintable) character written as its
/// escape; borrowed when there is none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unprintable) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_unprintable(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn controls_and_overrides_are_escaped() {
        assert_eq!(printable("\u{1b}[2J\nforged"), "\\u{1b}[2J\\nforged");
        assert_eq!(printable("a\tb\r\u{7f}\u{9b}"), "a\\tb\\r\\u{7f}\\u{9b}");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert!(matches!(printable("plain `name` ü 名前"), Cow::Borrowed(_)));
    }

    proptest! {
        #[test]
        fn nothing_unprintable_survives(s in any::<String>()) {
            let p = printable(&s);
            prop_assert!(!p.chars().any(is_unprintable), "{p:?}");
            if !s.chars().any(is_unprintable) {
                prop_assert_eq!(&*p, &*s);
            }
        }
    }
}

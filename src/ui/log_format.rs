//! How the logs pane writes an event: at the time it happened, not when the console heard
//! of it.
//!
//! tui-logger stamps every record with the moment it is logged. The master's events reach
//! the console through `StreamLogs` and are logged again here, so they used to show the
//! console's clock: on connecting, the master's backlog (up to 200 events, some hours old)
//! all appeared at the second the console started, and a master that had been up since
//! 03:52 said "listening" at 03:53. Each relayed event now carries its own time as the field
//! [`AT_FIELD`], which [`EventTimeFormatter`] shows instead of the record's stamp. Times are
//! UTC, as in the files pane and in every log file.

use ratatui::style::Style;
use ratatui::text::{Line, Span};
use tui_logger::{ExtLogRecord, LogFormatter};

/// The field that carries a relayed event's own time, in Unix milliseconds. tui-logger
/// writes an event's fields in name order before its message, so this one (before
/// `message`) opens the record's text as ` at_ms: 1764647565000 …`.
pub const AT_FIELD: &str = "at_ms";

/// Columns a continuation line is indented by (the width of `HH:MM:SS L `).
const INDENT: usize = 11;

/// Formats each record as `HH:MM:SS L target message`, wrapped to the pane.
pub struct EventTimeFormatter {
    pub style: Style,
    pub style_error: Style,
    pub style_warn: Style,
    pub style_debug: Style,
}

impl LogFormatter for EventTimeFormatter {
    fn min_width(&self) -> u16 {
        INDENT as u16 + 4
    }

    fn format(&self, width: usize, evt: &ExtLogRecord) -> Vec<Line<'_>> {
        let stamped = evt.timestamp.timestamp().as_millisecond();
        let (at_ms, message) = event_time(evt.msg(), stamped);
        let (style, level) = match evt.level.as_str() {
            "ERROR" => (self.style_error, 'E'),
            "WARN" => (self.style_warn, 'W'),
            "INFO" => (self.style, 'I'),
            "DEBUG" => (self.style_debug, 'D'),
            _ => (self.style_debug, 'T'),
        };
        let head = format!("{} {level} {} ", clock(at_ms), evt.target());
        wrap(&head, message, width)
            .into_iter()
            .map(|l| Line::from(Span::styled(l, style)))
            .collect()
    }
}

/// The event's own time and its text: the [`AT_FIELD`] of a relayed event, or `stamped`
/// (when it was logged) for any other.
pub fn event_time(msg: &str, stamped: i64) -> (i64, &str) {
    let own = msg
        .strip_prefix(' ')
        .and_then(|m| m.strip_prefix(AT_FIELD))
        .and_then(|m| m.strip_prefix(": "))
        .and_then(|rest| {
            let (digits, text) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((digits.parse::<i64>().ok()?, text))
        })
        .filter(|(ms, _)| *ms > 0);
    match own {
        Some((ms, text)) => (ms, text.trim_start()),
        None => (stamped, msg.trim_start()),
    }
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
pub fn clock(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// `head` and the message's first line, then its further lines, each cut to `width`
/// columns; every line after the first is indented under the message.
fn wrap(head: &str, message: &str, width: usize) -> Vec<String> {
    let width = width.max(INDENT + 1);
    let mut lines = message.lines();
    let first = format!("{head}{}", lines.next().unwrap_or(""));
    let pieces = std::iter::once((false, first.as_str())).chain(lines.map(|l| (true, l)));
    let mut out = Vec::new();
    for (indented, text) in pieces {
        let chars: Vec<char> = text.chars().collect();
        // The first piece of a message's first line has the whole width; the rest sit
        // under the message.
        let first_room = if indented { width - INDENT } else { width };
        let (start, rest) = chars.split_at(first_room.min(chars.len()));
        let indent = |part: &[char]| format!("{}{}", " ".repeat(INDENT), String::from_iter(part));
        out.push(if indented {
            indent(start)
        } else {
            start.iter().collect()
        });
        out.extend(rest.chunks(width - INDENT).map(indent));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_event_keeps_its_own_time() {
        let (ms, text) = event_time(" at_ms: 1764647565000 master listening", 9);
        assert_eq!((ms, text), (1_764_647_565_000, "master listening"));
        assert_eq!(clock(ms), "03:52:45");
    }

    #[test]
    fn any_other_event_keeps_its_stamp() {
        assert_eq!(event_time(" console started", 7), (7, "console started"));
        // A message that merely starts like the field is not mistaken for it.
        assert_eq!(event_time(" at_ms: soon", 7), (7, "at_ms: soon"));
        assert_eq!(event_time(" at_ms: -5 x", 7), (7, "at_ms: -5 x"));
        assert_eq!(event_time("", 7), (7, ""));
    }

    #[test]
    fn clock_wraps_at_midnight_and_before_the_epoch() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock(86_399_999), "23:59:59");
        assert_eq!(clock(86_400_000), "00:00:00");
        assert_eq!(clock(-1000), "23:59:59");
    }

    #[test]
    fn long_and_multi_line_messages_wrap_under_the_message() {
        let lines = wrap("12:00:00 I m ", "abcdefghij\nsecond", 16);
        assert_eq!(
            lines,
            vec![
                "12:00:00 I m abc".to_string(),
                format!("{}defgh", " ".repeat(INDENT)),
                format!("{}ij", " ".repeat(INDENT)),
                format!("{}secon", " ".repeat(INDENT)),
                format!("{}d", " ".repeat(INDENT)),
            ]
        );
        // Narrower than the indent: still a line per piece, never a panic.
        assert!(!wrap("h ", "x", 0).is_empty());
        assert_eq!(wrap("h ", "", 40), vec!["h ".to_string()]);
    }
}

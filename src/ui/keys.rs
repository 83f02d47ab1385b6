//! Every key binding, declared once: the footer hints and the `?` help overlay are generated
//! from this list, so they cannot drift from what the keys do.

/// Where a binding applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    Workers,
    Files,
    Transfers,
    Logs,
}

impl Scope {
    pub fn title(self) -> &'static str {
        match self {
            Scope::Global => "Everywhere",
            Scope::Workers => "Workers pane",
            Scope::Files => "Files pane",
            Scope::Transfers => "Transfers pane",
            Scope::Logs => "Logs pane",
        }
    }
}

/// One binding as shown to people.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub keys: &'static str,
    /// Short label for the footer.
    pub hint: &'static str,
    /// Longer text for the help overlay.
    pub help: &'static str,
    pub scope: Scope,
    /// Shown in the footer (the rest only in `?`).
    pub footer: bool,
}

const fn b(
    keys: &'static str,
    hint: &'static str,
    help: &'static str,
    scope: Scope,
    footer: bool,
) -> Binding {
    Binding {
        keys,
        hint,
        help,
        scope,
        footer,
    }
}

/// All bindings, in the order the help overlay lists them.
pub const BINDINGS: &[Binding] = &[
    b(
        "u",
        "upload",
        "upload files chosen in a file picker",
        Scope::Global,
        true,
    ),
    b(
        "Tab/1-4",
        "pane",
        "next pane / jump to workers, files, transfers, logs",
        Scope::Global,
        true,
    ),
    b(
        "↑↓/jk",
        "move",
        "move the selection (PgUp/PgDn, g/G: page, top, bottom)",
        Scope::Global,
        false,
    ),
    b(
        "r",
        "refresh",
        "refresh status and the file list now",
        Scope::Global,
        false,
    ),
    b("?", "help", "show or hide this help", Scope::Global, true),
    b(
        "q/Ctrl-C",
        "quit",
        "quit (transfers in progress are cancelled)",
        Scope::Global,
        true,
    ),
    b(
        "Enter",
        "detail",
        "file detail: checksum and the chunk → worker map",
        Scope::Files,
        true,
    ),
    b(
        "d",
        "download",
        "download the marked (or selected) files",
        Scope::Files,
        true,
    ),
    b(
        "x/Del",
        "delete",
        "delete the marked (or selected) files, after confirmation",
        Scope::Files,
        true,
    ),
    b(
        "Space",
        "mark",
        "mark or unmark a file for download/delete",
        Scope::Files,
        false,
    ),
    b(
        "/",
        "filter",
        "filter files by name (Esc clears)",
        Scope::Files,
        true,
    ),
    b(
        "s/S",
        "sort",
        "sort by the next column / reverse the order",
        Scope::Files,
        true,
    ),
    b(
        "s/S",
        "sort",
        "sort by the next column / reverse the order",
        Scope::Workers,
        true,
    ),
    b(
        "c",
        "cancel",
        "cancel the selected transfer",
        Scope::Transfers,
        true,
    ),
    b(
        "C",
        "clear",
        "clear finished transfers",
        Scope::Transfers,
        true,
    ),
    b(
        "/",
        "search",
        "search the log (Esc clears)",
        Scope::Logs,
        true,
    ),
    b(
        "v",
        "level",
        "cycle the lowest level shown: info, warn, error, debug",
        Scope::Logs,
        true,
    ),
    b(
        "PgUp/PgDn",
        "scroll",
        "scroll; autoscroll pauses until End or Esc",
        Scope::Logs,
        true,
    ),
];

/// Keys inside the file picker (shown in its own footer).
pub const PICKER_HINT: &str = "type to filter · ↑↓ move · Enter open dir / upload · Space mark · Bksp/← up · . hidden · Tab upload marked · Esc cancel";

/// The footer line for a pane: `?` first (so the way to every key is never cut off on a
/// narrow terminal), then the pane's own bindings, then the other global ones.
pub fn footer(scope: Scope) -> Vec<(&'static str, &'static str)> {
    let help = BINDINGS.iter().filter(|b| b.keys == "?");
    help.chain(BINDINGS.iter().filter(|b| b.footer && b.scope == scope))
        .chain(
            BINDINGS
                .iter()
                .filter(|b| b.footer && b.scope == Scope::Global && b.keys != "?"),
        )
        .map(|b| (b.keys, b.hint))
        .collect()
}

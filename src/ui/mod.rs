//! The cluster console (`dfs-tui`): a ratatui dashboard over the same client library as
//! `--cmd`.
//!
//! - [`app`]: state and the state machine (`update(msg) -> effects`); no I/O but the picker's
//!   directory reads.
//! - [`view`]: drawing, a pure function of the state.
//! - [`keys`]: every binding, once; the footer and the help overlay come from it.
//! - [`log_format`]: the logs pane's lines, each at its event's own time.
//! - [`picker`]: the local file picker.
//! - [`runtime`]: terminal, input, background polling, effects.

pub mod app;
pub mod keys;
pub mod log_format;
pub mod picker;
pub mod runtime;
pub mod view;

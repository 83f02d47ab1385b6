//! The local file picker behind `u`: navigate directories, filter as you type, toggle hidden
//! files, see sizes, and mark several files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
}

/// What a key did in the picker.
#[derive(Debug, PartialEq, Eq)]
pub enum PickerOutcome {
    Stay,
    Cancel,
    /// Upload these files.
    Upload(Vec<PathBuf>),
}

/// Picker state: a directory, its entries, the filter, the selection and the marked files.
#[derive(Debug, Clone)]
pub struct Picker {
    pub cwd: PathBuf,
    pub entries: Vec<Entry>,
    pub filter: String,
    pub show_hidden: bool,
    pub selected: usize,
    pub marked: BTreeSet<PathBuf>,
    pub error: Option<String>,
}

impl Picker {
    pub fn open(dir: &Path) -> Picker {
        let mut p = Picker {
            cwd: dir.to_path_buf(),
            entries: Vec::new(),
            filter: String::new(),
            show_hidden: false,
            selected: 0,
            marked: BTreeSet::new(),
            error: None,
        };
        p.reload();
        p
    }

    /// Re-reads the directory: directories first, then files, each by name.
    pub fn reload(&mut self) {
        self.entries.clear();
        self.error = None;
        match std::fs::read_dir(&self.cwd) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    // Follow symlinks for the kind and size, like a shell would. Only what
                    // can be opened or uploaded is listed: a FIFO would hold its upload until
                    // something wrote to it (and the console cannot cancel a blocked read),
                    // and a socket, device or broken link cannot be uploaded at all.
                    let (is_dir, size) = match std::fs::metadata(e.path()) {
                        Ok(m) if m.is_dir() => (true, 0),
                        Ok(m) if m.is_file() => (false, m.len()),
                        _ => continue,
                    };
                    self.entries.push(Entry { name, is_dir, size });
                }
            }
            Err(e) => self.error = Some(format!("cannot read {}: {e}", self.cwd.display())),
        }
        self.entries
            .sort_by(|a, b| b.is_dir.cmp(&a.is_dir).then_with(|| a.name.cmp(&b.name)));
        self.selected = 0;
    }

    /// Entries that pass the hidden toggle and the filter (case-insensitive substring).
    pub fn visible(&self) -> Vec<&Entry> {
        let f = self.filter.to_lowercase();
        self.entries
            .iter()
            .filter(|e| self.show_hidden || !e.name.starts_with('.'))
            .filter(|e| f.is_empty() || e.name.to_lowercase().contains(&f))
            .collect()
    }

    pub fn current(&self) -> Option<Entry> {
        self.visible().get(self.selected).map(|e| (*e).clone())
    }

    pub fn move_by(&mut self, delta: isize) {
        let n = self.visible().len();
        if n == 0 {
            self.selected = 0;
            return;
        }
        let s = self.selected as isize + delta;
        self.selected = s.clamp(0, n as isize - 1) as usize;
    }

    pub fn go_up(&mut self) {
        if let Some(parent) = self.cwd.parent() {
            let from = self
                .cwd
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            self.cwd = parent.to_path_buf();
            self.filter.clear();
            self.reload();
            if let Some(from) = from
                && let Some(i) = self.visible().iter().position(|e| e.name == from)
            {
                self.selected = i;
            }
        }
    }

    pub fn toggle_mark(&mut self) {
        if let Some(e) = self.current()
            && !e.is_dir
        {
            let p = self.cwd.join(&e.name);
            if !self.marked.remove(&p) {
                self.marked.insert(p);
            }
            self.move_by(1);
        }
    }

    /// Enter: open a directory, or upload the marked files (or the selected one).
    pub fn enter(&mut self) -> PickerOutcome {
        match self.current() {
            Some(e) if e.is_dir => {
                self.cwd = self.cwd.join(&e.name);
                self.filter.clear();
                self.reload();
                PickerOutcome::Stay
            }
            Some(e) => {
                if self.marked.is_empty() {
                    PickerOutcome::Upload(vec![self.cwd.join(&e.name)])
                } else {
                    PickerOutcome::Upload(self.marked.iter().cloned().collect())
                }
            }
            None => PickerOutcome::Stay,
        }
    }

    pub fn type_char(&mut self, c: char) {
        self.filter.push(c);
        self.selected = 0;
    }

    pub fn backspace(&mut self) {
        if self.filter.pop().is_none() {
            self.go_up();
        } else {
            self.selected = 0;
        }
    }

    pub fn toggle_hidden(&mut self) {
        self.show_hidden = !self.show_hidden;
        self.selected = 0;
    }
}

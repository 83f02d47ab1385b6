//! Name validation: never panics, and an accepted name is one plain path component.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if dfs::names::validate(name).is_ok() {
        let mut comps = std::path::Path::new(name).components();
        assert!(matches!(
            comps.next(),
            Some(std::path::Component::Normal(_))
        ));
        assert!(comps.next().is_none());
    }
});

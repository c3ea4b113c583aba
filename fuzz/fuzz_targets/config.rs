//! `ripen.toml` from any text: an error that names the file, or a
//! configuration, never a panic. Paths resolve against a directory that
//! does not exist, so nothing outside is read.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ripen_engine::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(
        text,
        Path::new("fuzz.toml"),
        Path::new("/nonexistent/ripen-fuzz"),
    ) {
        Ok(config) => assert!(!config.listen.is_empty()),
        Err(e) => assert!(
            e.starts_with("fuzz.toml"),
            "an error that does not name the file: {e}"
        ),
    }
});

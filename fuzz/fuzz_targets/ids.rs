//! The identifiers a request names: entity ids (paths and the list cursor
//! `after`), worker task ids, and the RFC 3339 times of the list filters.
//! Whatever parses prints back to something that parses to the same (a
//! time from 1970 on; an earlier one bounds a list like 1970 does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ripen_engine::TaskId;
use ripen_store::EntityId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = text.parse::<EntityId>() {
        assert_eq!(id.to_string().parse::<EntityId>().ok(), Some(id));
    }
    if let Ok(task) = text.parse::<TaskId>() {
        assert_eq!(task.to_string().parse::<TaskId>().ok(), Some(task));
    }
    if let Some(us) = ripen_server::parse_rfc3339(text) {
        if us >= 0 {
            let written = ripen_engine::time::rfc3339(us);
            assert_eq!(ripen_server::parse_rfc3339(&written), Some(us), "{written}");
        } else {
            // Ripen writes no time before 1970; as a list bound, one is
            // the start of all ids.
            assert_eq!(EntityId::first_minted_at(us), EntityId::first_minted_at(0));
        }
    }
});

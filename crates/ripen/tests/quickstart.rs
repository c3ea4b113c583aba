//! The README's quickstart, run as written: its commands, in a copy of
//! `examples/quickstart`, with the `ripen` under test first on the PATH
//! (the `cargo install` line is what puts it there for a user).
//!
//! The quickstart uses the fixed ports 8080 and 9000, so this binary holds
//! this one test.

use std::path::Path;
use std::process::{Command, Stdio};

const RIPEN: &str = env!("CARGO_BIN_EXE_ripen");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            copy_dir(&path, &to.join(&name));
        } else if !name.to_string_lossy().starts_with("ripen.db") {
            std::fs::copy(&path, to.join(&name)).expect("copy");
        }
    }
}

#[test]
fn the_readme_quickstart_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme
        .find("<!-- quickstart -->")
        .expect("a quickstart block");
    let end = readme.find("<!-- /quickstart -->").expect("its end");
    let block = &readme[start..end];
    let commands: Vec<&str> = block
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect();
    assert!(commands.len() >= 4, "{block}");
    assert!(commands[0].starts_with("cargo install --path crates/ripen"));

    // A checkout of its own, with nothing left from an earlier run.
    let dir = std::env::temp_dir().join(format!("ripen-quickstart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(
        &root.join("examples/quickstart"),
        &dir.join("examples/quickstart"),
    );
    let bin = Path::new(RIPEN).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The commands after `cargo install`, as they are; the background jobs
    // are stopped when the script ends, however it ends.
    let script = format!(
        "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{}\n",
        commands[1..].join("\n")
    );
    let python = std::env::var("RIPEN_TEST_PYTHON").ok();
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .env("PATH", &path)
        .env_remove("RIPEN_SERVER")
        .stdin(Stdio::null());
    if let Some(python) = python {
        // The tests' own Python, first on the PATH as `python3` too.
        let venv_bin = Path::new(&python).parent().expect("venv bin");
        cmd.env("PATH", format!("{}:{path}", venv_bin.display()));
    }
    let out = cmd.output().expect("run the quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the quickstart failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("\"status\": \"pending\""), "{stdout}");
    assert!(
        stdout.contains("retrying"),
        "the KYC retry is shown:\n{stdout}"
    );
    assert!(stdout.contains("HTTP 503"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("kyc") && l.contains("succeeded") && l.contains("attempts 2")),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("entity ") && last.ends_with(" is ready"),
        "{stdout}"
    );
}

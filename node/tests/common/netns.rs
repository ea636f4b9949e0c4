//! What the network-namespace tests share: running a command (or failing the test with its
//! stderr) and whether namespaces can be made here at all.

use std::process::{Command, Output};

/// Runs `args` and returns what it did.
pub(crate) fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Runs `args`; fails the test with its stderr unless it succeeds.
pub(crate) fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why a namespace test cannot run here (not root, no `ip netns`), if it cannot.
pub(crate) fn skip_reason() -> Option<String> {
    match Command::new("id").arg("-u").output() {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
        Ok(o) => {
            return Some(format!(
                "not root (uid {})",
                String::from_utf8_lossy(&o.stdout).trim()
            ));
        }
        Err(e) => return Some(format!("cannot run `id -u`: {e}")),
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns` is unavailable: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` is unavailable: {e}")),
    }
}

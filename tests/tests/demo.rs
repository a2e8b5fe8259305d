//! The README's first command (`cargo xtask demo`, which runs `selvedge-lab demo`) goes end
//! to end: every connection byte-exact, each carried the way the demo says (mutual TLS
//! across nodes; the same-node handoff never on the wire), the lab torn down after.

use std::process::Command;

#[test]
fn the_demo_carries_every_connection_and_says_how() {
    let out = Command::new(env!("CARGO_BIN_EXE_selvedge-lab")).arg("demo").output().expect("run the demo");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the demo failed ({}):\n{stdout}\n{stderr}", out.status);
    for wrong in ["PLAINTEXT", "FAILED", "MISMATCH"] {
        assert!(!stdout.contains(wrong), "the demo says {wrong}:\n{stdout}");
    }
    assert_eq!(stdout.matches("byte-exact").count(), 3, "{stdout}");
    assert!(stdout.contains("mutual TLS: spiffe://"), "{stdout}");
    assert!(stdout.contains("same node, never on the wire: spiffe://"), "{stdout}");
    assert!(stdout.contains("lab torn down"), "{stdout}");
}

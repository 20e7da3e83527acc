//! The README's configuration table lists every setting, with its variable and default.

use proxy::config::Config;

#[test]
fn readme_documents_every_setting() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut missing = Vec::new();
    for (key, env, default, _) in Config::reference() {
        let row = format!("| `{key}` | `{env}` | `--{}` | `{}` |", key.replace('_', "-"), default.trim_matches('"'));
        if !readme.contains(&row) {
            missing.push(row);
        }
    }
    assert!(missing.is_empty(), "README.md lacks these configuration rows (or they are out of date):\n{}", missing.join("\n"));
}

/// `cargo test -p proxy --test config_reference -- --ignored --nocapture` prints the table.
#[test]
#[ignore]
fn print_configuration_table() {
    println!("| key | environment | flag | default | meaning |\n|---|---|---|---|---|");
    for (key, env, default, doc) in Config::reference() {
        println!("| `{key}` | `{env}` | `--{}` | `{}` | {doc} |", key.replace('_', "-"), default.trim_matches('"'));
    }
}

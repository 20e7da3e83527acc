//! The README's configuration tables list every setting of both processes, with variable,
//! flag, default and meaning.

use mqfleet_ops::config::{reference_rows, undocumented};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
}

#[test]
fn readme_documents_every_proxy_setting() {
    let missing = undocumented(&readme(), &proxy::config::Config::reference());
    assert!(missing.is_empty(), "README.md lacks these mqfleet-proxy rows (or they are out of date):\n{}", missing.join("\n"));
}

#[test]
fn readme_documents_every_shard_setting() {
    let missing = undocumented(&readme(), &broker_shard::config::Config::reference());
    assert!(missing.is_empty(), "README.md lacks these mqfleet-shard rows (or they are out of date):\n{}", missing.join("\n"));
}

/// `cargo test -p proxy --test config_reference -- --ignored --nocapture` prints both tables.
#[test]
#[ignore]
fn print_configuration_tables() {
    for (name, reference) in
        [("mqfleet-proxy", proxy::config::Config::reference()), ("mqfleet-shard", broker_shard::config::Config::reference())]
    {
        println!("{name}:\n| key | environment | flag | default | meaning |\n|---|---|---|---|---|");
        for row in reference_rows(&reference) {
            println!("{row}");
        }
    }
}

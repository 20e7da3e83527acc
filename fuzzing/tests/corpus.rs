//! Replays every checked-in fuzz corpus (`fuzz/corpus/TARGET/*`): inputs the fuzzer found
//! interesting, minimised, and every past finding. Each target must take each input.

use std::path::Path;

#[test]
fn every_corpus_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, target) in fuzzing::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target has a corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: empty corpus");
        for input in &inputs {
            let data = match std::fs::read(input) {
                Ok(d) => d,
                // A fuzzer running beside the tests replaces inputs as it minimises them.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: {e}", input.display()),
            };
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", input.display());
        }
        println!("{name}: {} inputs", inputs.len());
    }
}

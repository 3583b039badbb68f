//! The workflow parser and compiler on arbitrary bytes: as the root file
//! (YAML and JSON) and as a called file. It must never panic, and every error
//! must name its file.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use switchyard_orchestrator::compile::compile_bundle;
use switchyard_orchestrator::workflow::Bundle;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let registry = switchyard_orchestrator::offline_registry();
    let caller = "name: caller\nsteps:\n  - {id: c, kind: workflow, with: {path: called.yaml}}\n".to_owned();
    let bundles = [
        Bundle { root: "wf.yaml".into(), files: BTreeMap::from([("wf.yaml".to_owned(), text.clone())]) },
        Bundle { root: "wf.json".into(), files: BTreeMap::from([("wf.json".to_owned(), text.clone())]) },
        Bundle {
            root: "caller.yaml".into(),
            files: BTreeMap::from([("caller.yaml".to_owned(), caller), ("called.yaml".to_owned(), text)]),
        },
    ];
    for bundle in &bundles {
        if let Err(errors) = compile_bundle(bundle, &registry) {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(!e.file.is_empty() && !e.message.is_empty(), "{e:?}");
            }
        }
    }
});

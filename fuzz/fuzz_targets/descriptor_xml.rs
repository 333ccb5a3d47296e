//! Fuzz the bounded XML reader and the DiskDescriptor.xml interpretation: never panic, and
//! any chain it accepts is bounded, free of repeats and listed in every extent.
#![no_main]

use imgsafe::format::ploop::descriptor::{parse_xml, Descriptor, MAX_CHAIN_DEPTH};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(root) = parse_xml(data) else { return };
    let Ok(desc) = Descriptor::from_xml(&root) else {
        return;
    };
    assert!(!desc.storages.is_empty());
    if let Ok(chain) = desc.chain() {
        assert!(!chain.is_empty() && chain.len() <= MAX_CHAIN_DEPTH);
        let mut seen = chain.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), chain.len());
        for g in &chain {
            assert!(desc.storages.iter().all(|s| s.image_for(g).is_some()));
        }
    }
});

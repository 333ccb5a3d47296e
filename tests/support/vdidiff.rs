//! Differencing VDI images for tests, which qemu-img cannot write: a dynamic VDI made by
//! qemu-img is turned into a differencing one by changing the three header fields that
//! differ (VirtualBox `VDIHEADER1`: `u32Type` = 4, `uuidLinkage` = the parent's
//! `uuidCreate`, `uuidParentModify` = the parent's `uuidModify`). The block map and
//! blocks stay exactly as qemu-img wrote them: free blocks are those the overlay left
//! zero, and they read from the parent.
#![allow(dead_code)]

use std::path::Path;

/// `u32Type` offset and the differencing type.
const TYPE_AT: usize = 0x4c;
const TYPE_DIFF: u32 = 4;
/// `uuidCreate`, `uuidModify`, `uuidLinkage`, `uuidParentModify` offsets.
const UUID_CREATE_AT: usize = 0x188;
const UUID_MODIFY_AT: usize = 0x198;
const UUID_LINK_AT: usize = 0x1a8;
const UUID_PARENT_MODIFY_AT: usize = 0x1b8;

/// Make the dynamic VDI at `child` a differencing image over the VDI at `parent`.
pub fn link_to_parent(child: &Path, parent: &Path) {
    let p = std::fs::read(parent).unwrap();
    let mut c = std::fs::read(child).unwrap();
    assert_eq!(
        u32::from_le_bytes(c[TYPE_AT..TYPE_AT + 4].try_into().unwrap()),
        1,
        "{} is not a dynamic VDI",
        child.display()
    );
    c[TYPE_AT..TYPE_AT + 4].copy_from_slice(&TYPE_DIFF.to_le_bytes());
    c[UUID_LINK_AT..UUID_LINK_AT + 16].copy_from_slice(&p[UUID_CREATE_AT..UUID_CREATE_AT + 16]);
    c[UUID_PARENT_MODIFY_AT..UUID_PARENT_MODIFY_AT + 16]
        .copy_from_slice(&p[UUID_MODIFY_AT..UUID_MODIFY_AT + 16]);
    std::fs::write(child, c).unwrap();
}

/// The 1 MiB blocks (qemu-img's VDI block size) of `b` that differ from `a`, with the
/// others zeroed: the raw overlay whose qemu-made VDI allocates exactly those blocks.
/// Panics if a changed block is all zeros in `b` (it would be left free, not stored).
pub fn overlay(a: &[u8], b: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 1 << 20;
    let mut out = vec![0u8; b.len()];
    for (i, (ca, cb)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        if ca != cb {
            assert!(cb.iter().any(|&x| x != 0), "changed block {i} is all zeros");
            out[i * BLOCK..i * BLOCK + cb.len()].copy_from_slice(cb);
        }
    }
    out
}

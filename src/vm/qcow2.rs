//! An empty qcow2 file: the throwaway copy-on-write layer `imgsafe shell --overlay` puts
//! over the image disk inside QEMU, so the guest may write to its filesystems while
//! every write lands in a private temp file and the image is never touched.
//!
//! Only what QEMU needs to open an empty image is written (version 2 header, one
//! refcount table cluster, one refcount block, a zeroed L1 table), the same layout
//! `qemu-img create -f qcow2` produces; QEMU grows the tables as the guest writes.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// 64 KiB clusters, QEMU's default.
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Each L2 table (one cluster of 8-byte entries) maps this many bytes.
const L2_SPAN: u64 = (CLUSTER / 8) * CLUSTER;
/// Largest virtual size accepted: the L1 table stays at most 32 MiB.
pub const MAX_SIZE: u64 = 1 << 55;

/// Create `path` as an empty qcow2 image of `size` bytes with no backing file (QEMU is
/// told the backing node when it opens the file).
pub fn create(path: &Path, size: u64) -> io::Result<()> {
    if size > MAX_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("overlay of {size} bytes is larger than qcow2 allows here"),
        ));
    }
    let l1_entries = size.div_ceil(L2_SPAN);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    // Cluster 0: header; 1: refcount table; 2: refcount block 0; 3..: L1 table.
    let (rc_table, rc_block, l1) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER);
    let used = 3 + l1_clusters;
    // One refcount block (16-bit entries) covers CLUSTER / 2 clusters.
    if used > CLUSTER / 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "overlay L1 table too large",
        ));
    }

    let mut header = Vec::with_capacity(72);
    header.extend_from_slice(b"QFI\xfb");
    header.extend_from_slice(&2u32.to_be_bytes()); // version
    header.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
    header.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
    header.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    header.extend_from_slice(&size.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    header.extend_from_slice(&(l1_entries as u32).to_be_bytes()); // l1_size
    header.extend_from_slice(&l1.to_be_bytes()); // l1_table_offset
    header.extend_from_slice(&rc_table.to_be_bytes()); // refcount_table_offset
    header.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    header.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    header.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset

    let mut image = vec![0u8; ((3 + l1_clusters) * CLUSTER) as usize];
    image[..header.len()].copy_from_slice(&header);
    image[rc_table as usize..rc_table as usize + 8].copy_from_slice(&rc_block.to_be_bytes());
    for c in 0..used as usize {
        let at = rc_block as usize + 2 * c;
        image[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    // Owner-only whatever the umask: the guest's writes land here.
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&image)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is missing: install the Debian package qemu-utils")
    }

    #[test]
    fn qemu_img_checks_and_reads_the_empty_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.qcow2");
        let size = 3 * L2_SPAN + 12345 * 512;

        create(&path, size).unwrap();

        let p = path.to_str().unwrap();
        let check = qemu_img(&["check", "-f", "qcow2", p]);
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        assert!(String::from_utf8_lossy(&check.stdout).contains("No errors"));
        let info = qemu_img(&["info", "--output=json", "-f", "qcow2", p]);
        let doc: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(doc["virtual-size"], size);
        // Empty: reading it through QEMU gives zeros only (a map with no data).
        let map = qemu_img(&["map", "--output=json", "-f", "qcow2", p]);
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        assert!(
            map.as_array().unwrap().iter().all(|e| e["data"] == false),
            "{map}"
        );
    }

    #[test]
    fn existing_file_is_never_overwritten() {
        let f = tempfile::NamedTempFile::new().unwrap();

        let err = create(f.path(), 1 << 20).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }
}

//! Choosing kernel modules: the wanted ones plus their dependencies (modules.dep) and
//! soft pre-dependencies (modules.softdep), ordered so that each module comes after
//! everything it needs.

use super::ApplianceError;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Module name as the kernel normalises it: `-` becomes `_`, extension dropped.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Parsed modules.dep: module name → (relative path, dependencies' relative paths).
pub struct DepTable {
    by_name: HashMap<String, (String, Vec<String>)>,
    softdeps: HashMap<String, Vec<String>>,
}

impl DepTable {
    /// Parse the text of modules.dep and modules.softdep.
    pub fn parse(dep: &str, softdep: &str) -> Self {
        let mut by_name = HashMap::new();
        for line in dep.lines() {
            let Some((m, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(String::from).collect();
            by_name.insert(module_name(m), (m.trim().to_string(), deps));
        }
        let mut softdeps: HashMap<String, Vec<String>> = HashMap::new();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(m) = words.next() else { continue };
            let mut pre = false;
            for w in words {
                match w {
                    "pre:" => pre = true,
                    "post:" => pre = false,
                    _ if pre => softdeps
                        .entry(module_name(m))
                        .or_default()
                        .push(w.to_string()),
                    _ => {}
                }
            }
        }
        DepTable { by_name, softdeps }
    }

    /// Relative paths of `wanted` and everything they need, dependencies first. Names
    /// that are not modules here (built into the kernel, or aliases like
    /// `crypto-crc32c`) are skipped.
    pub fn order(&self, wanted: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for w in wanted {
            self.visit(&module_name(w), &mut seen, &mut out, 0);
        }
        out
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, out: &mut Vec<String>, depth: usize) {
        if depth > 64 || !seen.insert(name.to_string()) {
            return;
        }
        let Some((path, deps)) = self.by_name.get(name) else {
            return;
        };
        for s in self.softdeps.get(name).into_iter().flatten() {
            self.visit(&module_name(s), seen, out, depth + 1);
        }
        // modules.dep lists a module's dependencies with the ones loaded last first.
        for d in deps.iter().rev() {
            self.visit(&module_name(d), seen, out, depth + 1);
        }
        out.push(path.clone());
    }
}

/// Absolute paths of the modules to put in the appliance, in load order.
pub fn resolve(dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>, ApplianceError> {
    let dep_path = dir.join("modules.dep");
    let dep = fs::read_to_string(&dep_path).map_err(|e| ApplianceError::io(&dep_path, e))?;
    let softdep = fs::read_to_string(dir.join("modules.softdep")).unwrap_or_default();
    let table = DepTable::parse(&dep, &softdep);
    let paths: Vec<PathBuf> = table
        .order(wanted)
        .into_iter()
        .map(|rel| dir.join(rel))
        .collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(ApplianceError::Invalid(format!(
            "{} is listed in modules.dep but missing",
            missing.display()
        )));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko\n\
kernel/lib/libcrc32c.ko:\n\
kernel/drivers/virtio/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/virtio/virtio.ko:\n\
kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/drivers/md/dm-mod.ko:\n\
kernel/crypto/xxhash_generic.ko:\n\
kernel/fs/btrfs/btrfs.ko: kernel/lib/libcrc32c.ko\n";
    const SOFT: &str = "softdep btrfs pre: xxhash64 xxhash_generic crypto-crc32c\n";

    #[test]
    fn dependencies_come_first() {
        let t = DepTable::parse(DEP, SOFT);

        let order = t.order(&["virtio_blk", "xfs"]);

        assert_eq!(
            order,
            vec![
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_blk.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/fs/xfs/xfs.ko",
            ]
        );
    }

    #[test]
    fn dashes_and_softdeps_are_handled_and_unknowns_skipped() {
        let t = DepTable::parse(DEP, SOFT);

        let order = t.order(&["dm_mod", "btrfs", "no_such_module"]);

        assert_eq!(
            order,
            vec![
                "kernel/drivers/md/dm-mod.ko",
                "kernel/crypto/xxhash_generic.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/fs/btrfs/btrfs.ko"
            ]
        );
    }
}

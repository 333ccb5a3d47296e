//! `imgsafe appliance`: build the appliance ahead of time and show what it is made of.

use crate::cli::ApplianceArgs;
use crate::Result;
use crate::{appliance, warm};

/// Run `imgsafe appliance`.
pub fn run(args: ApplianceArgs) -> Result<()> {
    let stage = crate::trace::stage("appliance");
    let a = appliance::ensure()?;
    stage.done("");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    // The saved state a command would restore with this environment's settings.
    let cfg = crate::session::warm_config(&crate::session::vm_config(&a, &std::env::temp_dir())?);
    let key = warm::key(&cfg);
    let state = appliance::cache_root()
        .ok()
        .and_then(|root| warm::Store::open(&root).ok())
        .and_then(|store| {
            store
                .lookup(&key, u64::from(cfg.memory_mib) << 20)
                .ok()
                .flatten()
        });
    if args.json {
        let v = serde_json::json!({
            "kernel": a.kernel,
            "kernel_release": a.kernel_release,
            "pvh": a.pvh,
            "initrd": a.initrd,
            "initrd_size": size(&a.initrd),
            "warm_state": {
                "key": key,
                "path": state.as_ref().map(|s| &s.dir),
                "bytes": state.as_ref().map(warm::State::disk_usage),
            },
        });
        println!("{v}");
    } else {
        println!(
            "kernel:  {} ({}{})",
            a.kernel.display(),
            a.kernel_release,
            if a.pvh { ", PVH ELF" } else { ", bzImage" }
        );
        println!(
            "initrd:  {} ({} bytes)",
            a.initrd.display(),
            size(&a.initrd)
        );
        match &state {
            Some(s) => println!(
                "warm state: {} ({} bytes on disk, key {key})",
                s.dir.display(),
                s.disk_usage()
            ),
            None => println!("warm state: none yet for key {key} (the next command saves one)"),
        }
    }
    Ok(())
}

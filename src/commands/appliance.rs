//! `imgsafe appliance`: build the appliance ahead of time and show what it is made of.

use crate::appliance;
use crate::cli::ApplianceArgs;
use crate::Result;

/// Run `imgsafe appliance`.
pub fn run(args: ApplianceArgs) -> Result<()> {
    let stage = crate::trace::stage("appliance");
    let a = appliance::ensure()?;
    stage.done("");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if args.json {
        let v = serde_json::json!({
            "kernel": a.kernel,
            "kernel_release": a.kernel_release,
            "pvh": a.pvh,
            "initrd": a.initrd,
            "initrd_size": size(&a.initrd),
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
    }
    Ok(())
}

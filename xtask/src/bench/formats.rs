//! `formats`: the container decoders under load. The 1 GiB raw disk is converted by
//! qemu-img to a dynamic VHD, a Parallels (ploop) image, a qcow2 image (plain, and with
//! `-c` zlib-compressed clusters), a dynamic VDI, a dynamic VHDX and a sparse and a
//! stream-optimized VMDK; each is served by `imgsafe serve` (imgsafe's own decoder) and
//! by `qemu-nbd -f vpc|parallels|qcow2|vdi|vhdx|vmdk` (qemu's), and read whole with
//! `qemu-img convert -O raw`. `IMGSAFE_BENCH_FORMATS=qcow2,vdi` picks formats by file
//! name (`disk.vhd`, `disk.hds`, `disk.qcow2`, `disk-c.qcow2`, `disk.vdi`, `disk.vhdx`,
//! `disk.vmdk`, `disk-stream.vmdk`).

use super::nbd::{push, qemu_img_convert, remove, start_imgsafe, start_qemu_nbd, time_rounds};
use super::util::{self, output_dir, timed, Server};
use super::{Ctx, Row, RAW_SIZE};
use anyhow::Result;
use std::path::Path;

/// One container format: how qemu-img makes it and what qemu-nbd calls it.
struct Format {
    /// Name in messages.
    label: &'static str,
    /// File name of the converted image.
    file: &'static str,
    /// qemu-img convert `-O` and `-o` arguments.
    create: &'static [&'static str],
    /// qemu-nbd `-f`.
    qemu_format: &'static str,
}

const FORMATS: [Format; 8] = [
    Format {
        label: "dynamic VHD",
        file: "disk.vhd",
        create: &["-O", "vpc", "-o", "subformat=dynamic"],
        qemu_format: "vpc",
    },
    Format {
        label: "ploop/parallels",
        file: "disk.hds",
        create: &["-O", "parallels"],
        qemu_format: "parallels",
    },
    Format {
        label: "qcow2",
        file: "disk.qcow2",
        create: &["-O", "qcow2"],
        qemu_format: "qcow2",
    },
    Format {
        label: "qcow2 compressed (-c)",
        file: "disk-c.qcow2",
        create: &["-c", "-O", "qcow2"],
        qemu_format: "qcow2",
    },
    Format {
        label: "dynamic VDI",
        file: "disk.vdi",
        create: &["-O", "vdi"],
        qemu_format: "vdi",
    },
    Format {
        label: "dynamic VHDX",
        file: "disk.vhdx",
        create: &["-O", "vhdx", "-o", "subformat=dynamic"],
        qemu_format: "vhdx",
    },
    Format {
        label: "sparse VMDK",
        file: "disk.vmdk",
        create: &["-O", "vmdk", "-o", "subformat=monolithicSparse"],
        qemu_format: "vmdk",
    },
    Format {
        label: "stream-optimized VMDK",
        file: "disk-stream.vmdk",
        create: &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        qemu_format: "vmdk",
    },
];

/// Run the group.
pub fn run(ctx: &mut Ctx) -> Result<()> {
    let raw = ctx.raw_image()?;
    let out = output_dir(ctx.dir(), 2 * RAW_SIZE)?;
    // IMGSAFE_BENCH_FORMATS=qcow2,vmdk: only the formats whose file name contains one.
    let wanted = std::env::var("IMGSAFE_BENCH_FORMATS").unwrap_or_default();
    let picked = |f: &Format| {
        wanted.is_empty()
            || wanted
                .split(',')
                .any(|w| !w.is_empty() && f.file.contains(w))
    };
    for f in FORMATS.iter().filter(|f| picked(f)) {
        println!("\n--- {} ---", f.label);
        if let Err(e) = one_format(ctx, &raw, out.path(), f) {
            println!("{}: stopped: {e:#}", f.label);
            ctx.rows
                .push(Row::skipped("formats", f.label, &format!("{e:#}")));
        }
    }
    Ok(())
}

fn one_format(ctx: &mut Ctx, raw: &Path, out: &Path, f: &Format) -> Result<()> {
    let image = ctx.dir().join(f.file);
    let mut convert = crate::tool("qemu-img", "qemu-utils")?;
    convert
        .args(["convert", "-f", "raw"])
        .args(f.create)
        .arg(raw)
        .arg(&image);
    let t = timed(&mut convert)?;
    println!(
        "made {} with qemu-img in {:.1} s ({} MiB on disk)",
        image.display(),
        t.secs,
        std::fs::metadata(&image)?.len() >> 20
    );
    util::warm_page_cache(&image)?;

    // Probe the imgsafe side first with `imgsafe info`: its error says why a decoder
    // refuses the image far better than a server that exits.
    let imgsafe = match timed(
        std::process::Command::new(&ctx.imgsafe)
            .arg("info")
            .arg(&image),
    ) {
        Ok(_) => start_imgsafe(ctx, &image, &format!("fmt-{}-imgsafe", f.file)),
        Err(e) => Err(format!("imgsafe cannot open the {} image: {e:#}", f.label)),
    };
    if let Err(why) = &imgsafe {
        println!("imgsafe side skipped: {why}");
    }
    let qemu = start_qemu_nbd(ctx, &image, &format!("fmt-{}-qemu", f.file), f.qemu_format);
    let sides = [("imgsafe", &imgsafe), ("qemu-nbd", &qemu)];
    report_sizes(&sides);
    check_same_bytes(&sides, out, raw);

    let target = out.join("copy.raw");
    let what = format!("qemu-img convert 1 GiB {} -> raw", f.label);
    let times = time_rounds(&sides, |s| qemu_img_convert(s, &target), || remove(&target));
    push(ctx, "formats", &what, times);
    Ok(())
}

/// Virtual sizes can differ from the raw source (VHD rounds to its CHS geometry).
fn report_sizes(sides: &[(&str, &Result<Server, String>)]) {
    let sizes: Vec<String> = sides
        .iter()
        .filter_map(|(n, s)| s.as_ref().ok().map(|s| format!("{n} {} bytes", s.size)))
        .collect();
    println!("export size: {}", sizes.join(", "));
}

/// Copy the whole export once from each server (untimed) and check that both copies are
/// the same bytes, and how they relate to the raw source.
fn check_same_bytes(sides: &[(&str, &Result<Server, String>)], out: &Path, raw: &Path) {
    let copies: Vec<_> = sides
        .iter()
        .filter_map(|(name, s)| {
            s.as_ref()
                .ok()
                .map(|s| (*name, s, out.join(format!("check-{name}.raw"))))
        })
        .collect();
    let mut made = Vec::new();
    for (name, server, path) in &copies {
        match qemu_img_convert(server, path).and_then(|mut c| timed(&mut c)) {
            Ok(_) => made.push((*name, path.clone())),
            Err(e) => println!("{name}: check copy failed: {e:#}"),
        }
    }
    if let [(a, pa), (b, pb)] = made.as_slice() {
        match util::first_difference(pa, pb) {
            Ok(None) => println!("check: {a} and {b} read byte-identical data"),
            Ok(Some(d)) => println!(
                "check: {a} and {b} DISAGREE ({d}): imgsafe's numbers below are not trustworthy"
            ),
            Err(e) => println!("check: cannot compare: {e:#}"),
        }
    }
    for (name, path) in &made {
        match util::first_difference(path, raw) {
            Ok(None) => println!("check: {name}'s copy equals the raw source"),
            Ok(Some(d)) => println!("check: {name}'s copy vs the raw source: {d}"),
            Err(e) => println!("check: cannot compare with the source: {e:#}"),
        }
        let _ = remove(path);
    }
}

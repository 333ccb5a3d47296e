//! Decompressing one qcow2 compressed cluster.
//!
//! Crates, chosen for the size of the binary (it is also the static guest agent) and for
//! being pure Rust: `miniz_oxide` for raw deflate (what zlib-compressed qcow2 clusters
//! are: no zlib header, QEMU compresses with a 4 KiB window), used through its core
//! no-allocation API; `ruzstd` for zstd, a decoder only. The `zstd` crate binds the C
//! library and links its compressor too, several hundred KiB more in every binary and a
//! C toolchain for the static agent build, for a feature read on the host only.

use super::header::Compression;
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use std::io::Read;

/// Largest zstd window accepted: a cluster is at most 2 MiB, so a frame QEMU writes never
/// needs more; a hostile frame declaring a larger one is refused before allocating it.
pub const MAX_ZSTD_WINDOW: u64 = 4 << 20;

/// Fill `out` (one cluster) from the compressed bytes `input`. The input may run on past
/// the compressed stream (QEMU pads to 512-byte sectors); the stream must fill `out`
/// exactly, as QEMU requires.
pub fn decompress_cluster(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Deflate => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    // The decompressor state is ~11 KiB: on the heap, not the reader threads' stacks.
    let mut state = Box::<DecompressorOxide>::default();
    let (status, _, written) = decompress(
        &mut state,
        input,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    let filled = written == out.len();
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if filled => Ok(()),
        TINFLStatus::Done => Err(format!(
            "deflate stream ends after {written} of {} bytes",
            out.len()
        )),
        s => Err(format!("deflate stream is invalid ({s:?})")),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut src = input;
    let mut dec =
        ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut src, MAX_ZSTD_WINDOW)
            .map_err(|e| format!("zstd frame is invalid ({e})"))?;
    let mut filled = 0;
    while filled < out.len() {
        match dec.read(&mut out[filled..]) {
            Ok(0) => {
                return Err(format!(
                    "zstd frame ends after {filled} of {} bytes",
                    out.len()
                ))
            }
            Ok(n) => filled += n,
            Err(e) => return Err(format!("zstd frame is invalid ({e})")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_short_streams_are_errors_not_panics() {
        let mut out = vec![0u8; 4096];

        let bad_deflate = decompress_cluster(Compression::Deflate, &[0xff; 64], &mut out);
        let empty_deflate = decompress_cluster(Compression::Deflate, &[], &mut out);
        let bad_zstd =
            decompress_cluster(Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 0xff], &mut out);

        assert!(bad_deflate.is_err());
        assert!(empty_deflate.is_err());
        assert!(bad_zstd.is_err());
    }

    #[test]
    fn stored_deflate_block_fills_the_cluster() {
        // A final stored block: BFINAL=1, BTYPE=00, then LEN, NLEN and the bytes.
        let data = [7u8; 16];
        let mut stream = vec![0x01, 16, 0, !16, 0xff];
        stream.extend_from_slice(&data);
        stream.extend_from_slice(&[0; 100]); // sector padding after the stream
        let mut out = [0u8; 16];

        decompress_cluster(Compression::Deflate, &stream, &mut out).unwrap();

        assert_eq!(out, data);
    }
}

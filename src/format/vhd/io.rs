//! Coalesced positioned reads: several pieces of the file that lie close together are
//! read with one `preadv`, the small gaps between them (sector bitmaps, clear-bit
//! sectors) going into a scratch buffer.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Largest gap between two pieces that is read and thrown away rather than costing a
/// second system call (covers the bitmap of blocks up to 16 MiB).
pub const MAX_GAP: u64 = 4096;
/// Most iovecs per call (Linux IOV_MAX is 1024).
const MAX_IOV: usize = 1024;
/// Most bytes per call, so one call never asks the kernel for an unbounded transfer.
const MAX_GROUP_BYTES: u64 = 64 << 20;

/// `len` bytes of the file at `file_off` go to `buf[buf_start..buf_start + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset in the file.
    pub file_off: u64,
    /// Offset in the caller's buffer.
    pub buf_start: usize,
    /// Length in bytes.
    pub len: usize,
}

impl Segment {
    fn file_end(&self) -> u64 {
        self.file_off + self.len as u64
    }
}

/// Split `segs` (in buffer order) into groups that one `preadv` can serve: file offsets
/// ascending with gaps of at most [`MAX_GAP`]. Returns the group boundaries as ranges.
pub fn group(segs: &[Segment]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut iovs = 0;
    let mut bytes = 0u64;
    for i in 0..segs.len() {
        if i > start {
            let prev = &segs[i - 1];
            let gap = segs[i].file_off.checked_sub(prev.file_end());
            let fits = matches!(gap, Some(g) if g <= MAX_GAP)
                && iovs + 2 <= MAX_IOV
                && bytes + MAX_GAP + segs[i].len as u64 <= MAX_GROUP_BYTES;
            if !fits {
                out.push(start..i);
                start = i;
                iovs = 0;
                bytes = 0;
            }
        }
        iovs += 2;
        bytes += segs[i].len as u64 + MAX_GAP;
    }
    if start < segs.len() {
        out.push(start..segs.len());
    }
    out
}

/// Read every segment of `segs` from `file` into `buf`. Segments must lie inside `buf`
/// and not overlap each other (checked; a violation is an `InvalidInput` error).
pub fn read_segments(file: &File, buf: &mut [u8], segs: &[Segment]) -> io::Result<()> {
    check_disjoint(buf.len(), segs)?;
    let mut scratch = vec![0u8; MAX_GAP as usize];
    for g in group(segs) {
        let part = &segs[g];
        if part.len() == 1 {
            let s = part[0];
            file.read_exact_at(&mut buf[s.buf_start..s.buf_start + s.len], s.file_off)?;
            continue;
        }
        if !preadv_group(file, buf, part, &mut scratch)? {
            // Short read (a file shrinking under us, a signal): redo piece by piece so
            // the error, if any, is the precise one.
            for s in part {
                file.read_exact_at(&mut buf[s.buf_start..s.buf_start + s.len], s.file_off)?;
            }
        }
    }
    Ok(())
}

/// One `preadv` for a group; `Ok(false)` on a short read.
fn preadv_group(
    file: &File,
    buf: &mut [u8],
    part: &[Segment],
    scratch: &mut [u8],
) -> io::Result<bool> {
    let base = buf.as_mut_ptr();
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(part.len() * 2);
    let mut total = 0usize;
    for (i, s) in part.iter().enumerate() {
        if i > 0 {
            let gap = (s.file_off - part[i - 1].file_end()) as usize;
            if gap > 0 {
                iov.push(libc::iovec {
                    iov_base: scratch.as_mut_ptr().cast(),
                    iov_len: gap,
                });
                total += gap;
            }
        }
        // SAFETY: check_disjoint proved buf_start + len <= buf.len(), so the pointer stays
        // inside `buf`.
        let p = unsafe { base.add(s.buf_start) };
        iov.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: s.len,
        });
        total += s.len;
    }
    let off = libc::off_t::try_from(part[0].file_off)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
    loop {
        // SAFETY: every iovec points into `buf` (disjoint ranges, checked) or into
        // `scratch` (gaps ≤ MAX_GAP = scratch.len(); several gaps may share it, its
        // contents are discarded). Both outlive the call; no Rust reference to them is
        // used while the kernel writes.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        };
        if n >= 0 {
            return Ok(n as usize == total);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Segments lie inside a buffer of `len` bytes and do not overlap one another.
fn check_disjoint(len: usize, segs: &[Segment]) -> io::Result<()> {
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(segs.len());
    for s in segs {
        let end = s.buf_start.checked_add(s.len).filter(|&e| e <= len);
        let Some(end) = end else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read segment outside the buffer",
            ));
        };
        ranges.push((s.buf_start, end));
    }
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "overlapping read segments",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn seg(file_off: u64, buf_start: usize, len: usize) -> Segment {
        Segment {
            file_off,
            buf_start,
            len,
        }
    }

    #[test]
    fn group_joins_close_ascending_pieces_and_splits_far_or_backward_ones() {
        let segs = [
            seg(0, 0, 512),
            seg(1024, 512, 512),
            seg(1_000_000, 1024, 512),
            seg(0, 1536, 512),
        ];

        let groups = group(&segs);

        assert_eq!(groups, vec![0..2, 2..3, 3..4]);
    }

    #[test]
    fn read_segments_scatters_with_gaps_skipped() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let segs = [seg(100, 10, 50), seg(1000, 0, 10), seg(5000, 60, 40)];
        let mut buf = vec![0u8; 100];

        read_segments(&f, &mut buf, &segs).unwrap();

        assert_eq!(&buf[10..60], &data[100..150]);
        assert_eq!(&buf[0..10], &data[1000..1010]);
        assert_eq!(&buf[60..100], &data[5000..5040]);
    }

    #[test]
    fn read_segments_past_eof_is_an_error() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 1000]).unwrap();
        let segs = [seg(0, 0, 10), seg(990, 10, 20)];
        let mut buf = vec![0u8; 30];

        let err = read_segments(&f, &mut buf, &segs).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn overlapping_segments_are_rejected() {
        let f = tempfile::tempfile().unwrap();
        let mut buf = vec![0u8; 30];

        let err = read_segments(&f, &mut buf, &[seg(0, 0, 20), seg(100, 10, 10)]).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}

//! Integers read at fixed offsets of header and table buffers, for every decoder and the
//! NBD server. Callers pass offsets inside buffers whose length they checked (fixed-size
//! headers, whole tables read as one): an offset past the end is a bug in imgsafe, not in
//! the image, and panics like any slice index. Tables indexed by values that come from
//! the image use the `_or_zero` reads, which cannot panic.

/// Little-endian u16 at `at`.
pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(b, at))
}

/// Little-endian u32 at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(b, at))
}

/// Little-endian u64 at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(b, at))
}

/// Big-endian u16 at `at`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(array(b, at))
}

/// Big-endian u32 at `at`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(array(b, at))
}

/// Big-endian u64 at `at`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(array(b, at))
}

/// Big-endian u64 at `at`, or 0 (an unallocated entry) when it is not all inside `b`.
pub fn be64_or_zero(b: &[u8], at: usize) -> u64 {
    b.get(at..at.saturating_add(8))
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().expect("a slice of N bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_width_and_order_at_its_offset() {
        let b = [0xff, 1, 2, 3, 4, 5, 6, 7, 8];

        assert_eq!(le16(&b, 1), 0x0201);
        assert_eq!(be16(&b, 1), 0x0102);
        assert_eq!(le32(&b, 1), 0x0403_0201);
        assert_eq!(be32(&b, 1), 0x0102_0304);
        assert_eq!(le64(&b, 1), 0x0807_0605_0403_0201);
        assert_eq!(be64(&b, 1), 0x0102_0304_0506_0708);
    }

    #[test]
    fn an_entry_past_the_end_reads_as_zero() {
        let b = [1u8; 12];

        assert_eq!(be64_or_zero(&b, 4), u64::from_be_bytes([1; 8]));
        assert_eq!(be64_or_zero(&b, 5), 0);
        assert_eq!(be64_or_zero(&b, usize::MAX), 0);
    }
}

//! CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of VHDX headers
//! and region tables (MS-VHDX 2.2.2: "CRC-32C hash over the entire 4 KB structure, with
//! the Checksum field taking the value of zero during the computation"). A byte-wise
//! table is fast enough: only a few 4 KiB and 64 KiB structures are checked per open.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// One entry per byte value, built at compile time.
const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C of `data` with the four bytes at `zero_at` read as zeros (the checksum field).
pub fn crc32c_with_hole(data: &[u8], zero_at: usize) -> u32 {
    let mut c = !0u32;
    for (i, &b) in data.iter().enumerate() {
        let b = if (zero_at..zero_at + 4).contains(&i) {
            0
        } else {
            b
        };
        c = TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720 B.4 and every CRC catalogue).
        assert_eq!(crc32c_with_hole(b"123456789", usize::MAX - 4), 0xE306_9283);
    }

    #[test]
    fn the_hole_reads_as_zeros() {
        let mut with = *b"ab\xff\xff\xff\xffcd";
        let plain = crc32c_with_hole(b"ab\0\0\0\0cd", usize::MAX - 4);

        with[2] = 7;

        assert_eq!(crc32c_with_hole(&with, 2), plain);
    }
}

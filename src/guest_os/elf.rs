//! The architecture of a guest program from its ELF header (System V gABI, "ELF
//! Header"): class, byte order and `e_machine`, spelt as `uname -m` and libguestfs do.

/// Bytes of the header read: the identification plus `e_type` and `e_machine`.
pub const HEADER_LEN: usize = 20;

/// `e_ident[EI_CLASS]`: 32-bit objects.
const ELFCLASS32: u8 = 1;
/// `e_ident[EI_CLASS]`: 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]`: little-endian.
const ELFDATA2LSB: u8 = 1;
/// `e_ident[EI_DATA]`: big-endian.
const ELFDATA2MSB: u8 = 2;

/// The architecture name, or None when `head` is not an ELF header imgsafe knows.
pub fn arch(head: &[u8]) -> Option<&'static str> {
    let h = head.get(..HEADER_LEN)?;
    if &h[..4] != b"\x7fELF" {
        return None;
    }
    let (class, data) = (h[4], h[5]);
    let machine = match data {
        ELFDATA2LSB => u16::from_le_bytes([h[18], h[19]]),
        ELFDATA2MSB => u16::from_be_bytes([h[18], h[19]]),
        _ => return None,
    };
    let bits64 = match class {
        ELFCLASS32 => false,
        ELFCLASS64 => true,
        _ => return None,
    };
    let le = data == ELFDATA2LSB;
    Some(match (machine, bits64) {
        (3, false) => "i386",          // EM_386
        (62, true) => "x86_64",        // EM_X86_64
        (40, false) => "arm",          // EM_ARM
        (183, true) => "aarch64",      // EM_AARCH64
        (20, false) => "ppc",          // EM_PPC
        (21, true) if le => "ppc64le", // EM_PPC64
        (21, true) => "ppc64",
        (22, true) => "s390x", // EM_S390
        (22, false) => "s390",
        (8, false) if le => "mipsel", // EM_MIPS
        (8, false) => "mips",
        (8, true) if le => "mips64el",
        (8, true) => "mips64",
        (243, true) => "riscv64", // EM_RISCV
        (243, false) => "riscv32",
        (258, true) => "loongarch64", // EM_LOONGARCH
        (2, false) => "sparc",        // EM_SPARC
        (43, true) => "sparc64",      // EM_SPARCV9
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, data: u8, machine: [u8; 2]) -> Vec<u8> {
        let mut h = b"\x7fELF".to_vec();
        h.extend([class, data, 1, 0]);
        h.extend([0u8; 10]);
        h.extend(machine);
        h
    }

    #[test]
    fn x86_64_little_endian() {
        assert_eq!(arch(&header(2, 1, [62, 0])), Some("x86_64"));
    }

    #[test]
    fn big_endian_machine_is_read_big_endian() {
        assert_eq!(arch(&header(2, 2, [0, 22])), Some("s390x"));
        assert_eq!(arch(&header(2, 2, [0, 21])), Some("ppc64"));
    }

    #[test]
    fn short_or_foreign_headers_are_none() {
        assert_eq!(arch(b"\x7fELF"), None);
        assert_eq!(arch(&header(3, 1, [62, 0])), None);
        assert_eq!(arch(b"#!/bin/sh\n echo hi there!!"), None);
    }

    #[test]
    fn the_host_shell_is_recognised() {
        let head = std::fs::read("/bin/sh").unwrap();

        assert_eq!(arch(&head), Some(std::env::consts::ARCH));
    }
}

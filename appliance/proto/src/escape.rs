//! Octal escapes of the mount table format, shared by the agent (reading
//! /proc/self/mounts) and the host (reading the guest's /etc/fstab).

/// Undo the octal escapes of a /proc/mounts or fstab field (`\040` space, `\011` tab,
/// `\012` newline, `\134` backslash). A backslash not followed by three octal digits, or
/// followed by a value above `\377` (which fits no byte), is kept as written.
pub fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let digits = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match digits {
            Some(d) if d[0] <= b'3' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_field_escapes_are_decoded() {
        assert_eq!(
            unescape_octal(br"/sysroot/my\040dir\134x"),
            b"/sysroot/my dir\\x".to_vec()
        );
    }

    #[test]
    fn tab_newline_and_highest_byte_are_decoded() {
        let got = unescape_octal(br"a\011b\012c\377");

        assert_eq!(got, b"a\tb\nc\xff".to_vec());
    }

    #[test]
    fn incomplete_non_octal_and_too_large_escapes_are_kept_as_written() {
        for text in [
            &br"end\04"[..],
            br"x\09y",
            br"\400",
            br"\777",
            br"\\",
            br"\",
        ] {
            assert_eq!(unescape_octal(text), text.to_vec(), "{text:?}");
        }
    }

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(unescape_octal(b"/dev/vda1"), b"/dev/vda1".to_vec());
        assert_eq!(unescape_octal(b""), Vec::<u8>::new());
    }
}

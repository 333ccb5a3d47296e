//! Names LVM gives device-mapper devices, read by the agent (to list LVs) and by the host
//! (to match fstab's `/dev/mapper/VG-LV` to `/dev/VG/LV`): shared so both agree.

/// Longest VG or LV name LVM accepts (NAME_LEN - 1).
const MAX_NAME: usize = 127;

/// Split a device-mapper name made by LVM into (VG, LV): LVM doubles every `-` inside
/// the names and joins them with a single `-`. Layered devices (`vg-lv-real`) and
/// anything that is not a valid pair of LVM names give None.
pub fn split_dm_name(dm: &str) -> Option<(String, String)> {
    let mut parts = vec![String::new()];
    let mut chars = dm.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '-' {
            parts.last_mut()?.push(c);
        } else if chars.peek() == Some(&'-') {
            chars.next();
            parts.last_mut()?.push('-');
        } else {
            parts.push(String::new());
        }
    }
    match <[String; 2]>::try_from(parts) {
        Ok([vg, lv]) if valid_name(&vg) && valid_name(&lv) => Some((vg, lv)),
        _ => None,
    }
}

/// LVM's name rule (lib/misc/lvm-string.c): `[A-Za-z0-9+_.-]`, not starting with `-`,
/// not `.` or `..`, at most [`MAX_NAME`] bytes.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n != "."
        && n != ".."
        && !n.starts_with('-')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_names_split_at_single_dashes() {
        assert_eq!(
            split_dm_name("vg0-root"),
            Some(("vg0".into(), "root".into()))
        );
        assert_eq!(
            split_dm_name("my--vg-my--data"),
            Some(("my-vg".into(), "my-data".into()))
        );
    }

    #[test]
    fn layered_and_invalid_dm_names_are_not_lvs() {
        assert_eq!(split_dm_name("vg-lv-real"), None);
        assert_eq!(split_dm_name("plain"), None);
        assert_eq!(split_dm_name("vg-"), None);
        assert_eq!(split_dm_name("vg-.."), None);
        assert_eq!(split_dm_name("vg-a b"), None);
    }
}

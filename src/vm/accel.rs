//! Choosing the accelerator: KVM when this user can really use hardware KVM, else TCG.
//!
//! Opening /dev/kvm is not enough: some hosts expose a paravirtual KVM (e.g. `kvm_pvm`)
//! on which a stock guest kernel hangs. Only the hardware modules `kvm_intel` and
//! `kvm_amd` are trusted, which makes the choice instant and never needs a
//! boot-timeout-and-retry.

use super::config::Accel;
use std::ffi::OsString;
use std::path::Path;

/// Environment variable forcing the accelerator (`kvm` or `tcg`).
pub const ACCEL_ENV: &str = "IMGSAFE_ACCEL";
/// The KVM device.
const DEV_KVM: &str = "/dev/kvm";
/// Present when the Intel VT-x KVM module is loaded (or built in).
const SYS_KVM_INTEL: &str = "/sys/module/kvm_intel";
/// Present when the AMD-V KVM module is loaded (or built in).
const SYS_KVM_AMD: &str = "/sys/module/kvm_amd";
/// What imgsafe prints once when it falls back to TCG on its own.
pub const TCG_FALLBACK_NOTICE: &str = "imgsafe: no hardware KVM (/dev/kvm is not usable or \
     kvm_intel/kvm_amd is not loaded); using TCG software emulation, expect slower start-up";

/// `IMGSAFE_ACCEL` has a value imgsafe does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{ACCEL_ENV}={value:?}: expected `kvm` or `tcg`")]
pub struct AccelError {
    /// The value found (lossily decoded).
    pub value: String,
}

/// The facts the choice depends on, gathered by [`probe`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccelProbe {
    /// The value of `IMGSAFE_ACCEL`, if set.
    pub env: Option<OsString>,
    /// /dev/kvm could be opened for reading and writing by this user.
    pub dev_kvm_usable: bool,
    /// `kvm_intel` is loaded.
    pub kvm_intel: bool,
    /// `kvm_amd` is loaded.
    pub kvm_amd: bool,
}

/// Look at this host and this user.
pub fn probe() -> AccelProbe {
    AccelProbe {
        env: std::env::var_os(ACCEL_ENV),
        // Opening the device has no side effect; the descriptor is closed at once.
        dev_kvm_usable: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEV_KVM)
            .is_ok(),
        kvm_intel: Path::new(SYS_KVM_INTEL).exists(),
        kvm_amd: Path::new(SYS_KVM_AMD).exists(),
    }
}

/// Decide from probed facts. Returns the accelerator and, when imgsafe fell back to TCG
/// on its own, the one line to print on stderr. Pure.
pub fn decide(p: &AccelProbe) -> Result<(Accel, Option<String>), AccelError> {
    let named = super::env_choice(p.env.as_ref(), &[("kvm", Accel::Kvm), ("tcg", Accel::Tcg)])
        .map_err(|value| AccelError { value })?;
    if let Some(accel) = named {
        return Ok((accel, None));
    }
    if p.dev_kvm_usable && (p.kvm_intel || p.kvm_amd) {
        Ok((Accel::Kvm, None))
    } else {
        Ok((Accel::Tcg, Some(TCG_FALLBACK_NOTICE.to_string())))
    }
}

/// Probe this host and decide. See [`decide`].
pub fn choose() -> Result<(Accel, Option<String>), AccelError> {
    decide(&probe())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(env: Option<&str>, dev: bool, intel: bool, amd: bool) -> AccelProbe {
        AccelProbe {
            env: env.map(OsString::from),
            dev_kvm_usable: dev,
            kvm_intel: intel,
            kvm_amd: amd,
        }
    }

    #[test]
    fn table_of_cases() {
        let fallback = Some(TCG_FALLBACK_NOTICE.to_string());
        let cases = [
            (facts(None, true, true, false), Ok((Accel::Kvm, None))),
            (facts(None, true, false, true), Ok((Accel::Kvm, None))),
            // /dev/kvm works but only a paravirtual module (kvm_pvm) is loaded: TCG.
            (
                facts(None, true, false, false),
                Ok((Accel::Tcg, fallback.clone())),
            ),
            // Hardware module loaded but this user may not open /dev/kvm: TCG.
            (
                facts(None, false, true, false),
                Ok((Accel::Tcg, fallback.clone())),
            ),
            (
                facts(None, false, false, false),
                Ok((Accel::Tcg, fallback.clone())),
            ),
            (
                facts(Some(""), false, false, false),
                Ok((Accel::Tcg, fallback)),
            ),
            (
                facts(Some("kvm"), false, false, false),
                Ok((Accel::Kvm, None)),
            ),
            (
                facts(Some("KVM"), false, false, false),
                Ok((Accel::Kvm, None)),
            ),
            (facts(Some("tcg"), true, true, true), Ok((Accel::Tcg, None))),
            (
                facts(Some("hvf"), true, true, false),
                Err(AccelError {
                    value: "hvf".into(),
                }),
            ),
        ];

        for (input, expected) in cases {
            assert_eq!(decide(&input), expected, "{input:?}");
        }
    }

    #[test]
    fn bad_override_message_names_the_variable() {
        let err = decide(&facts(Some("fast"), false, false, false)).unwrap_err();

        assert_eq!(
            err.to_string(),
            "IMGSAFE_ACCEL=\"fast\": expected `kvm` or `tcg`"
        );
    }
}

//! The imgsafe guest agent.
//!
//! It is compiled into the imgsafe binary itself and copied into the appliance's
//! initramfs as `/init`, so it always travels with the host binary and always speaks
//! the same protocol version. When the binary starts as PID 1 it calls [`run`].

/// Run as the appliance's init: set up the guest, serve the host, power off.
pub fn run() -> ! {
    unimplemented!("agent")
}

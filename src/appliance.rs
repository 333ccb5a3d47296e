//! Locate, build and cache the appliance (kernel + initramfs).

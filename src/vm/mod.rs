//! QEMU: typed config → argv, process lifetime, QMP.

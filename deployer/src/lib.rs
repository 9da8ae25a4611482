//! Deploy specs, the hypervisor trait and its libvirt backend.

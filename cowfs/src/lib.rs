//! The FUSE union copy-on-write filesystem over store layers.

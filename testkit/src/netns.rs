//! A LAN of network namespaces for multi-host tests (to be built).

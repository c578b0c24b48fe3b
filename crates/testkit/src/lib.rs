//! Test kit: the WAN link emulator used by tests, benchmarks and `edgebus demo`.

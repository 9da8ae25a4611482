//! Fault injection for the integration tests, from `XENOD_TEST_*`
//! environment variables. Only builds with the `test-hooks` feature obey
//! them (the binary's test builds enable it through a dev-dependency);
//! release builds read no such variable.

/// The value of the test hook `name`, where hooks are obeyed.
pub(crate) fn var(name: &str) -> Option<String> {
    #[cfg(feature = "test-hooks")]
    {
        std::env::var(name).ok()
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        let _ = name;
        None
    }
}

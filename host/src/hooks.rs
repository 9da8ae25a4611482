//! Fault injection for the integration tests, from `XENOD_TEST_*`
//! environment variables. Only builds with the `test-hooks` feature obey
//! them (the binary's test builds enable it through a dev-dependency);
//! release builds read no such variable.

use crate::bail;
use crate::error::Result;

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

/// `XENOD_TEST_MIGRATE_FAIL=restore` makes a target fail its restore of a
/// guest after telling the source it is restoring.
pub(crate) fn fail(step: &str) -> Result<()> {
    if var("XENOD_TEST_MIGRATE_FAIL").is_some_and(|p| p == step) {
        bail!("XENOD_TEST_MIGRATE_FAIL={step}");
    }
    Ok(())
}

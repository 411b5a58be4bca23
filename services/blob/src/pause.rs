//! Named pause points for tests that drive real processes (debug builds only: release builds
//! compile them to nothing). With `PEERVAULT_TEST_PAUSE_DIR` set, a point `p` whose file
//! `<dir>/p.pause` exists writes `<dir>/p.reached` and waits until the `.pause` file is removed,
//! so a test can act (stop a pod, cut a link) at an exact step of a write instead of hoping
//! for the timing.

/// Waits at `point` while a test holds it (see the module documentation).
pub async fn point(point: &str) {
    #[cfg(debug_assertions)]
    {
        use std::{path::PathBuf, sync::OnceLock, time::Duration};
        static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
        let dir = DIR.get_or_init(|| std::env::var_os("PEERVAULT_TEST_PAUSE_DIR").map(PathBuf::from));
        let Some(dir) = dir else { return };
        let pause = dir.join(format!("{point}.pause"));
        if !pause.exists() {
            return;
        }
        tracing::warn!(point, "test pause point reached; waiting for the test to release it");
        let _ = std::fs::write(dir.join(format!("{point}.reached")), b"");
        while pause.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

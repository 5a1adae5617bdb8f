//! Small helpers every layer may use: the clock, MAC addresses, back-off and
//! supervised background tasks.
//! Nothing here knows Docker, the store's layout or the kernel.

pub mod backoff;
pub mod clock;
pub mod mac;
pub mod task;

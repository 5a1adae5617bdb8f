//! Small helpers every layer may use: the clock, MAC addresses and back-off.
//! Nothing here knows Docker, the store's layout or the kernel.

pub mod backoff;
pub mod clock;
pub mod mac;

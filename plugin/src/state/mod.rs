//! The store as rustoverlay lays it out: every key (`keys`), every value
//! (`records`) and how values are encoded (`codec`), the write fence for
//! acting on behalf of a gone host (`fence`), and opening the store named
//! by `--store` (`open`). Nothing here knows Docker or the kernel.

pub mod codec;
pub mod fence;
pub mod keys;
pub mod open;
pub mod records;

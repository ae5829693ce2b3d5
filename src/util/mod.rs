//! Small helpers more than one part of mkt needs, one copy each: clocks and
//! dates, files (logs, atomic writes), hashing, mounts, signals. Nothing here knows a
//! command.

pub mod fs;
pub mod hash;
pub mod mount;
pub mod shell;
pub mod signal;
pub mod time;

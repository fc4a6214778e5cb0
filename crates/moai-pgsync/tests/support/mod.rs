pub mod client;
pub mod pg;

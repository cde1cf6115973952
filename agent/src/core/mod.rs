//! The agent's state machines, sans IO: what a flow and a link decide,
//! as plain methods that take the time as a parameter and return what the
//! drivers ([`crate::flow`], [`crate::session`]) must do. As quinn-proto
//! is to quinn: nothing here awaits, spawns, reads a clock or touches a
//! socket, and nothing here imports the drivers.

pub(crate) mod ack;
pub(crate) mod flow;
pub(crate) mod link;
pub(crate) mod relay;
pub(crate) mod silence;
pub(crate) mod udp;

#[cfg(test)]
mod tests;

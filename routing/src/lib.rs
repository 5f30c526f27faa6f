//! Where a request is routed: routing keys, slots, the routing table and the decision.
//!
//! A request's decision reads exactly one immutable [`RoutingTable`] snapshot (the gateway
//! keeps it behind one `ArcSwap`): the key is taken from the request by the table's
//! [`KeySources`], hashed to a slot ([`slot_of`]), mapped to its home cell by an override or
//! the slot table, moved along the cell's failover targets when the home cell is not
//! serving ([`RoutingTable::decide`]), and finally an instance of the chosen cell is picked
//! by smooth weighted round robin ([`SmoothWrr`]).
//!
//! This crate must never depend on an HTTP engine (only on the `http` types), never block,
//! and never allocate on the decision path beyond what the key itself needs.

mod decide;
mod error;
mod gray;
mod key;
mod overrides;
mod slot;
mod table;
mod wrr;

pub use decide::{Decision, Explain, ExplainError, Reason, RouteInput};
pub use error::{DecideError, KeyError, TableError};
pub use gray::{GrayGuard, GrayMatch, GrayRule};
pub use key::{JwtSource, JwtVerify, KeySource, KeySources, MAX_KEY_LEN};
pub use overrides::Overrides;
pub use slot::{slot_of, DEFAULT_SLOT_COUNT};
pub use table::{
    Adaptive, AnonymousPolicy, Balance, Cell, CellIdx, CellSpec, CellState, GraySpec, Instance,
    InstanceSpec, KeyRing, Route, RouteSpec, RoutingTable, SloClass, TableBuilder, Timeouts,
    UpstreamProtocol,
};
pub use wrr::SmoothWrr;

//! In front of a Redis Cluster the app sees one plain Redis: where each
//! command goes ([`route`], the one classification), how the replies of a
//! command's parts are joined ([`merge`](mod@merge), the one join), the identity's
//! node connections ([`nodes`]) and the router task that runs it all
//! ([`router`]). The slot map it routes by is [`crate::upstream::slots`]
//! (re-exported here), which the connections below the router use too.

pub mod merge;
pub mod nodes;
pub mod route;
pub mod router;
pub mod stream;

pub use crate::upstream::slots::*;

//! The Trellis node agent as a library: the `mesh-agent` binary is a thin CLI over it, and the
//! fuzz targets (`fuzz/`) drive its parsers and matchers directly.
pub mod admin;
pub mod cluster_ca;
pub mod config;
pub mod drain;
pub mod enrolment;
pub mod handover;
pub mod identity;
pub mod inpod;
pub mod kubernetes;
pub mod live;
pub mod logformat;
pub mod logwriter;
pub mod metrics;
pub mod pinning;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod resilience;
pub mod route;
pub mod service;
pub mod source;
pub mod state;
pub mod status;
pub mod tls;
pub mod workers;
